//! The image guard against the second adversarial review (of the issue-14
//! fixes): each case replays an attack or a broken legitimate flow against a
//! real containerd 1.6 and real CNCF distribution registries, through
//! credlet's CRI proxy, with the node's pods in a fake API server.
//!
//! Needs root and the packages of `test-util/install-deps.sh`.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use credlet_imageguard::pods::{PodIndex, StaticPodIndex};
use credlet_imageguard::policy::{GuardPolicy, Provenance, VerifyPolicy};
use credlet_test_util::{
    ANYONE, Containerd, Grant, ImageSpec, Registry, build_and_push_image, delete_manifest,
    push_image,
};
use support::{
    Cluster, Kubelet, NODE, Proxy, TestPod, assert_status, auth, blocking, eventually, guard,
    kubelet_status, open_records, verifier,
};
use tonic::Code;

const ALICE: (&str, &str) = ("alice", "alice-secret");
const BOB: (&str, &str) = ("bob", "bob-secret");
const EVE: (&str, &str) = ("eve", "eve-secret");

/// The repositories recorded for an image.
fn repositories(records: &credlet_imageguard::records::RecordStore, id: &str) -> BTreeSet<String> {
    records.get(id).expect("record").repositories
}

/// Finding 1: containerd keeps content by digest, so a pull of another name
/// whose manifest is the cached private image's yields the private image
/// without downloading anything. That pull, and any check against the name
/// the caller brings, proves nothing about the private image: the guard
/// verifies against the repositories the image was recorded from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_name_for_a_cached_private_image_proves_nothing() {
    let registry = blocking(|| {
        Registry::start_token_auth(
            &[ALICE, EVE],
            &[
                Grant::new(ALICE.0, "team/app", &["pull", "push"]),
                Grant::new(ALICE.0, "evil/x", &["pull", "push"]),
                Grant::new(EVE.0, "evil/x", &["pull", "push"]),
                Grant::new(ANYONE, "evil/x", &["pull"]),
                Grant::new(ALICE.0, "pub/a", &["pull", "push"]),
                Grant::new(ALICE.0, "pub/b", &["pull", "push"]),
                Grant::new(ANYONE, "pub/a", &["pull"]),
                Grant::new(ANYONE, "pub/b", &["pull"]),
            ],
        )
    })
    .expect("registry");
    let app = blocking(|| build_and_push_image(&registry, "team/app", "v1", ALICE)).expect("app");
    // The same image under the attacker's public name, and under a second
    // tag of its own repository.
    let spec = ImageSpec::runnable(&format!("{}/team/app:v1", registry.host())).expect("spec");
    let alias = blocking(|| push_image(&registry, "evil/x", "v1", ALICE, &spec)).expect("alias");
    let v2 = blocking(|| push_image(&registry, "team/app", "v2", ALICE, &spec)).expect("v2");
    assert_eq!(alias.config_digest, app.config_digest, "one image");
    assert_eq!(v2.config_digest, app.config_digest, "one image");
    // A public image under two public names.
    let pub_a = blocking(|| build_and_push_image(&registry, "pub/a", "v1", ALICE)).expect("pub/a");
    let pub_spec = ImageSpec::runnable(&format!("{}/pub/a:v1", registry.host())).expect("spec");
    let pub_b = blocking(|| push_image(&registry, "pub/b", "v1", ALICE, &pub_spec)).expect("pub/b");
    assert_eq!(pub_b.config_digest, pub_a.config_digest, "one public image");

    let containerd = blocking(|| Containerd::start_with(&[&registry])).expect("containerd");
    let cluster = Cluster::start().await;
    let state = tempfile::tempdir().expect("state");
    let (records, _) = open_records(state.path());
    let (inspector, _metrics) = guard(
        GuardPolicy::default(),
        &records,
        &verifier(&[&registry]),
        cluster.pod_index(),
        cluster.event_sink(),
    );
    let proxy = Proxy::start(containerd.cri_socket(), inspector).await;
    let mut kubelet = proxy.kubelet().await;
    let private = app.reference.as_str();
    let alias_ref = alias.reference.as_str();
    let trusted: BTreeSet<String> = [app.repository.clone()].into();

    let a = cluster
        .add_pod(
            "team",
            "alice",
            &[(private, "IfNotPresent")],
            Some(auth(ALICE.0, ALICE.1)),
        )
        .await;
    let sa = kubelet.run_sandbox(&a).await;
    kubelet
        .start_container_of(&a, &sa, "app", private, "IfNotPresent")
        .await
        .expect("alice runs her image");

    // Eve, without credentials, pulls the alias: the runtime tags the
    // private image, but the pull is not proof.
    let e = cluster
        .add_pod("eve", "e", &[(alias_ref, "IfNotPresent")], None)
        .await;
    let se = kubelet.run_sandbox(&e).await;
    let eve = kubelet
        .start_container_of(&e, &se, "app", alias_ref, "IfNotPresent")
        .await;
    assert!(
        eve.is_err(),
        "eve ran the cached private image through the alias {alias_ref}: {eve:?}"
    );
    let status = kubelet_status(eve);
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains(&app.repository), "{status:?}");
    let record = records.get(&app.config_digest).expect("record");
    assert_eq!(record.provenance, Provenance::Credentials, "{record:?}");
    assert_eq!(record.repositories, trusted, "no alias recorded");

    // The alias tag is on the node now: still nothing for eve.
    assert_eq!(kubelet.image_id(alias_ref).await, None, "hidden from eve");
    assert_status(
        kubelet.pull(alias_ref, &e).await,
        Code::PermissionDenied,
        &["e", &app.repository],
    );
    assert_status(
        kubelet
            .create_container(&e, &se, "app", &app.config_digest, alias_ref)
            .await,
        Code::FailedPrecondition,
        &["eve/e", "no verification"],
    );
    // Eve's own credentials for the alias prove nothing either.
    let e2 = cluster
        .add_pod(
            "eve",
            "e2",
            &[(alias_ref, "IfNotPresent")],
            Some(auth(EVE.0, EVE.1)),
        )
        .await;
    assert_status(
        kubelet.pull(alias_ref, &e2).await,
        Code::PermissionDenied,
        &["eve/e2", &app.repository],
    );
    // Mallory, without credentials, by the private name.
    let m = cluster
        .add_pod("mallory", "m", &[(private, "IfNotPresent")], None)
        .await;
    let sm = kubelet.run_sandbox(&m).await;
    let mallory = kubelet
        .start_container_of(&m, &sm, "app", private, "IfNotPresent")
        .await;
    assert!(
        mallory.is_err(),
        "the private image went public: {mallory:?}"
    );
    assert_eq!(repositories(&records, &app.config_digest), trusted);

    // Legitimate: another tag of the image's own repository, with
    // credentials for it, and a public image under two public names.
    let a2 = cluster
        .add_pod(
            "team",
            "alice-2",
            &[(&v2.reference, "IfNotPresent")],
            Some(auth(ALICE.0, ALICE.1)),
        )
        .await;
    let sa2 = kubelet.run_sandbox(&a2).await;
    kubelet
        .start_container_of(&a2, &sa2, "app", &v2.reference, "IfNotPresent")
        .await
        .expect("a second tag of the image's own repository, with credentials");
    let p1 = cluster
        .add_pod("pub", "p1", &[(&pub_a.reference, "IfNotPresent")], None)
        .await;
    let p2 = cluster
        .add_pod("pub", "p2", &[(&pub_b.reference, "IfNotPresent")], None)
        .await;
    let sp1 = kubelet.run_sandbox(&p1).await;
    let sp2 = kubelet.run_sandbox(&p2).await;
    kubelet
        .start_container_of(&p1, &sp1, "app", &pub_a.reference, "IfNotPresent")
        .await
        .expect("a public image");
    kubelet
        .start_container_of(&p2, &sp2, "app", &pub_b.reference, "IfNotPresent")
        .await
        .expect("the same public image under a second public name");
    for sandbox in [&sa, &se, &sm, &sa2, &sp1, &sp2] {
        kubelet.remove_sandbox(sandbox).await;
    }
}

/// Finding 1 for an image the guard never saw pulled (preloaded, or pulled
/// behind its back), under `AlwaysVerify`: a pull of an alias must not make
/// it public either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_name_for_a_preloaded_private_image_proves_nothing() {
    let registry = blocking(|| {
        Registry::start_token_auth(
            &[ALICE],
            &[
                Grant::new(ALICE.0, "team/app", &["pull", "push"]),
                Grant::new(ALICE.0, "evil/x", &["pull", "push"]),
                Grant::new(ANYONE, "evil/x", &["pull"]),
            ],
        )
    })
    .expect("registry");
    let app = blocking(|| build_and_push_image(&registry, "team/app", "v1", ALICE)).expect("app");
    let spec = ImageSpec::runnable(&format!("{}/team/app:v1", registry.host())).expect("spec");
    let alias = blocking(|| push_image(&registry, "evil/x", "v1", ALICE, &spec)).expect("alias");
    let containerd = blocking(|| Containerd::start_with(&[&registry])).expect("containerd");
    // Preloaded: pulled straight from the runtime.
    let mut direct = Kubelet::connect(containerd.cri_socket()).await;
    direct
        .pull_with(&app.reference, None, Some(auth(ALICE.0, ALICE.1)))
        .await
        .expect("preload");

    let cluster = Cluster::start().await;
    let state = tempfile::tempdir().expect("state");
    let (records, _) = open_records(state.path());
    let policy = GuardPolicy {
        default: VerifyPolicy::AlwaysVerify,
        ..GuardPolicy::default()
    };
    let (inspector, _) = guard(
        policy,
        &records,
        &verifier(&[&registry]),
        cluster.pod_index(),
        cluster.event_sink(),
    );
    let proxy = Proxy::start(containerd.cri_socket(), inspector).await;
    let mut kubelet = proxy.kubelet().await;

    let e = cluster
        .add_pod("eve", "e", &[(&alias.reference, "IfNotPresent")], None)
        .await;
    let se = kubelet.run_sandbox(&e).await;
    let eve = kubelet
        .start_container_of(&e, &se, "app", &alias.reference, "IfNotPresent")
        .await;
    let m = cluster
        .add_pod("mallory", "m", &[(&app.reference, "IfNotPresent")], None)
        .await;
    let sm = kubelet.run_sandbox(&m).await;
    let mallory = kubelet
        .start_container_of(&m, &sm, "app", &app.reference, "IfNotPresent")
        .await;
    assert!(
        mallory.is_err(),
        "after eve's pull of the alias, a pod without credentials ran the preloaded private image: {mallory:?}"
    );
    assert!(eve.is_err(), "eve ran the preloaded private image: {eve:?}");
    assert_eq!(kubelet_status(eve).code(), Code::PermissionDenied);
    let record = records.get(&app.config_digest).expect("record");
    assert_ne!(record.provenance, Provenance::Anonymous, "{record:?}");
    assert!(
        !record.repositories.contains(&alias.repository),
        "{record:?}"
    );

    // Alice's credentials are verified against the image's own name.
    let a = cluster
        .add_pod(
            "team",
            "alice",
            &[(&app.reference, "IfNotPresent")],
            Some(auth(ALICE.0, ALICE.1)),
        )
        .await;
    let sa = kubelet.run_sandbox(&a).await;
    kubelet
        .start_container_of(&a, &sa, "app", &app.reference, "IfNotPresent")
        .await
        .expect("alice runs the image");
    for sandbox in [&se, &sm, &sa] {
        kubelet.remove_sandbox(sandbox).await;
    }
}

/// Finding 2: `RunPodSandbox` is not inspected, so a CRI caller can run a
/// sandbox that claims another pod's uid. The sandbox's uid, namespace and
/// name must be those of one pod on the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_that_claims_another_pods_uid_gets_nothing() {
    let registry = blocking(|| Registry::start_basic_auth(&[ALICE])).expect("registry");
    let app = blocking(|| build_and_push_image(&registry, "team/app", "v1", ALICE)).expect("app");
    let containerd = blocking(|| Containerd::start_with(&[&registry])).expect("containerd");
    let cluster = Cluster::start().await;
    let state = tempfile::tempdir().expect("state");
    let (records, _) = open_records(state.path());
    let (inspector, _) = guard(
        GuardPolicy::default(),
        &records,
        &verifier(&[&registry]),
        cluster.pod_index(),
        cluster.event_sink(),
    );
    let proxy = Proxy::start(containerd.cri_socket(), inspector).await;
    let mut kubelet = proxy.kubelet().await;
    let image = app.reference.as_str();
    let a = cluster
        .add_pod(
            "team",
            "alice",
            &[(image, "IfNotPresent")],
            Some(auth(ALICE.0, ALICE.1)),
        )
        .await;
    let sa = kubelet.run_sandbox(&a).await;
    kubelet
        .start_container_of(&a, &sa, "app", image, "IfNotPresent")
        .await
        .expect("alice runs her image");
    cluster
        .add_pod("eve", "forged", &[(image, "IfNotPresent")], None)
        .await;

    let mut sandboxes = vec![sa.clone()];
    for (namespace, name) in [("eve", "forged"), ("team", "alice-2"), ("eve", "alice")] {
        let forged = TestPod {
            namespace: namespace.into(),
            name: name.into(),
            uid: a.uid.clone(),
            auth: None,
        };
        let sandbox = kubelet.run_sandbox(&forged).await;
        let created = kubelet
            .create_container(&forged, &sandbox, "stolen", &app.config_digest, image)
            .await;
        assert!(
            created.is_err(),
            "a sandbox claiming pod {namespace}/{name} with alice's uid created a container from her private image: {created:?}"
        );
        assert_status(
            created,
            Code::PermissionDenied,
            &[&format!("{namespace}/{name}"), "team/alice", &a.uid],
        );
        sandboxes.push(sandbox);
    }
    // Alice's own sandbox still works.
    kubelet
        .create_container(&a, &sa, "again", &app.config_digest, image)
        .await
        .expect("alice's own sandbox");
    for sandbox in &sandboxes {
        kubelet.remove_sandbox(sandbox).await;
    }
}

/// Finding 2, without the API: before the pod list is
/// loaded, only decisions that rely on a pod's identity wait for it — a
/// pod's own verification. Static pods (uid from their manifest) are taken
/// as the runtime reports them, so a control-plane node starts; images that
/// need no verification pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_pod_list_only_decisions_that_need_a_pods_identity_wait() {
    let registry = blocking(|| Registry::start_basic_auth(&[ALICE])).expect("registry");
    let app = blocking(|| build_and_push_image(&registry, "team/app", "v1", ALICE)).expect("app");
    let containerd = blocking(|| Containerd::start_with(&[&registry])).expect("containerd");
    let pods = Arc::new(StaticPodIndex::new());
    pods.set_synced(false);
    let state = tempfile::tempdir().expect("state");
    let (records, _) = open_records(state.path());
    let (inspector, _) = guard(
        GuardPolicy::default(),
        &records,
        &verifier(&[&registry]),
        Arc::clone(&pods) as Arc<dyn PodIndex>,
        Arc::new(credlet_imageguard::events::NoEvents),
    );
    let proxy = Proxy::start(containerd.cri_socket(), inspector).await;
    let mut kubelet = proxy.kubelet().await;
    let image = app.reference.as_str();
    let creds = Some(auth(ALICE.0, ALICE.1));
    let regular = TestPod {
        namespace: "team".into(),
        name: "web".into(),
        uid: "0d7c6a43-1c5e-4b5e-9a83-6f7d3a2c1b10".into(),
        auth: creds.clone(),
    };
    // A static pod's uid is the hash of its manifest.
    let static_pod = TestPod {
        namespace: "kube-system".into(),
        name: format!("etcd-{NODE}"),
        uid: "3f2b9c4d5e6f708192a3b4c5d6e7f809".into(),
        auth: creds,
    };
    let s_regular = kubelet.run_sandbox(&regular).await;
    let s_static = kubelet.run_sandbox(&static_pod).await;
    kubelet
        .pull(image, &regular)
        .await
        .expect("pulled with credentials");
    kubelet.pull(image, &static_pod).await.expect("verified");

    kubelet
        .create_container(&static_pod, &s_static, "etcd", &app.config_digest, image)
        .await
        .expect("a static pod starts while the API is down");
    kubelet
        .create_container(
            &regular,
            &s_regular,
            "pause",
            containerd.pause_image_id(),
            credlet_test_util::PAUSE_IMAGE,
        )
        .await
        .expect("a preloaded image needs no identity");
    let waiting = kubelet
        .create_container(&regular, &s_regular, "web", &app.config_digest, image)
        .await;
    assert!(
        waiting.is_err(),
        "a pod's verification was relied on before its identity could be confirmed: {waiting:?}"
    );
    assert_status(waiting, Code::Unavailable, &["team/web", "pod list"]);

    // Once the list is in, the pod is confirmed.
    pods.insert(credlet_imageguard::pods::PodInfo {
        uid: regular.uid.clone(),
        namespace: regular.namespace.clone(),
        name: regular.name.clone(),
        images: Vec::new(),
    });
    pods.set_synced(true);
    kubelet
        .create_container(&regular, &s_regular, "web", &app.config_digest, image)
        .await
        .expect("confirmed");
    for sandbox in [&s_regular, &s_static] {
        kubelet.remove_sandbox(sandbox).await;
    }
}

/// Finding 7: a static pod's CRI uid is the hash of its manifest; its
/// mirror pod in the API has another uid and names the hash in the
/// `kubernetes.io/config.mirror` annotation. The guard must know the static
/// pod by it: its verification counts, the image is not hidden from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_pods_are_known_by_their_mirror_pods() {
    let registry = blocking(|| Registry::start_basic_auth(&[ALICE])).expect("registry");
    let app = blocking(|| build_and_push_image(&registry, "team/app", "v1", ALICE)).expect("app");
    let containerd = blocking(|| Containerd::start_with(&[&registry])).expect("containerd");
    let cluster = Cluster::start().await;
    let state = tempfile::tempdir().expect("state");
    let (records, _) = open_records(state.path());
    let (inspector, _) = guard(
        GuardPolicy::default(),
        &records,
        &verifier(&[&registry]),
        cluster.pod_index(),
        cluster.event_sink(),
    );
    let proxy = Proxy::start(containerd.cri_socket(), inspector).await;
    let mut kubelet = proxy.kubelet().await;
    let image = app.reference.as_str();
    let hash = "9a1b2c3d4e5f60718293a4b5c6d7e8f9";
    let name = format!("etcd-{NODE}");
    let mirror = cluster
        .api
        .create_pod(&serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": "kube-system",
                "annotations": {
                    "kubernetes.io/config.mirror": hash,
                    "kubernetes.io/config.hash": hash,
                    "kubernetes.io/config.source": "file",
                },
            },
            "spec": {
                "nodeName": NODE,
                "containers": [{"name": "etcd", "image": image, "imagePullPolicy": "IfNotPresent"}],
            },
            "status": {"phase": "Pending"},
        }))
        .expect("mirror pod");
    assert_ne!(mirror.metadata.uid.as_deref(), Some(hash));
    eventually("the mirror pod in the index", || {
        !cluster.pods.pods_using(&|i| i == image).is_empty()
    })
    .await;
    let static_pod = TestPod {
        namespace: "kube-system".into(),
        name,
        uid: hash.into(),
        auth: Some(auth(ALICE.0, ALICE.1)),
    };
    let sandbox = kubelet.run_sandbox(&static_pod).await;
    kubelet
        .start_container_of(&static_pod, &sandbox, "etcd", image, "IfNotPresent")
        .await
        .expect("the static pod pulls and runs its image");
    assert_eq!(
        kubelet.image_id(image).await.as_deref(),
        Some(app.config_digest.as_str()),
        "the image is hidden from the static pod that holds a verification"
    );
    // A restart of its container: no pull, no refusal.
    kubelet
        .start_container_of(&static_pod, &sandbox, "etcd-2", image, "IfNotPresent")
        .await
        .expect("restart");
    kubelet.remove_sandbox(&sandbox).await;
}

/// A registry with a public repository `pub/app` (alice may push and
/// delete), a containerd trusting it, and a guard under `AlwaysVerify`
/// whose positive answers hold 2 s.
struct PublicImage {
    registry: Registry,
    app: credlet_test_util::PushedImage,
    containerd: Containerd,
    cluster: Cluster,
    records: Arc<credlet_imageguard::records::RecordStore>,
    proxy: Proxy,
    _state: tempfile::TempDir,
}

const TTL: Duration = Duration::from_secs(2);

impl PublicImage {
    async fn start() -> Self {
        let registry = blocking(|| {
            Registry::start_token_auth(
                &[ALICE],
                &[
                    Grant::new(ALICE.0, "pub/app", &["pull", "push", "delete", "*"]),
                    Grant::new(ANYONE, "pub/app", &["pull"]),
                ],
            )
        })
        .expect("registry");
        let app =
            blocking(|| build_and_push_image(&registry, "pub/app", "v1", ALICE)).expect("push");
        let containerd = blocking(|| Containerd::start_with(&[&registry])).expect("containerd");
        let cluster = Cluster::start().await;
        let state = tempfile::tempdir().expect("state");
        let (records, _) = open_records(state.path());
        let policy = GuardPolicy {
            default: VerifyPolicy::AlwaysVerify,
            ttl: TTL,
            ..GuardPolicy::default()
        };
        let (inspector, _) = guard(
            policy,
            &records,
            &verifier(&[&registry]),
            cluster.pod_index(),
            cluster.event_sink(),
        );
        let proxy = Proxy::start(containerd.cri_socket(), inspector).await;
        Self {
            registry,
            app,
            containerd,
            cluster,
            records,
            proxy,
            _state: state,
        }
    }

    /// A pod without credentials pulls the image anonymously and runs it;
    /// returns the pod and its sandbox.
    async fn run_anonymously(&self, kubelet: &mut Kubelet, name: &str) -> (TestPod, String) {
        let image = self.app.reference.as_str();
        let pod = self
            .cluster
            .add_pod("pub", name, &[(image, "IfNotPresent")], None)
            .await;
        let sandbox = kubelet.run_sandbox(&pod).await;
        kubelet
            .start_container_of(&pod, &sandbox, "app", image, "IfNotPresent")
            .await
            .expect("a public image");
        (pod, sandbox)
    }
}

/// Finding 4: past the TTL, a public answer is asked again; while the
/// registry hangs, the last answer stands (a container restart of a public
/// image is not refused), concurrent checks are one, and a failed check is
/// not repeated at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_image_stays_public_while_its_registry_hangs() {
    let node = PublicImage::start().await;
    let mut kubelet = node.proxy.kubelet().await;
    let (pod, sandbox) = node.run_anonymously(&mut kubelet, "p").await;
    let id = node.app.config_digest.as_str();
    let image = node.app.reference.as_str();

    node.registry.pause();
    tokio::time::sleep(TTL + Duration::from_millis(500)).await;
    let started = Instant::now();
    let (mut k1, mut k2) = (kubelet.clone(), kubelet.clone());
    let (first, second) = tokio::join!(
        k1.create_container(&pod, &sandbox, "r1", id, image),
        k2.create_container(&pod, &sandbox, "r2", id, image),
    );
    let took = started.elapsed();
    node.registry.resume();
    assert!(
        first.is_ok() && second.is_ok(),
        "container restarts of a public image refused while its registry hangs: {first:?} {second:?}"
    );
    node.registry.pause();
    let again = Instant::now();
    kubelet
        .create_container(&pod, &sandbox, "r3", id, image)
        .await
        .expect("still public");
    let then = again.elapsed();
    node.registry.resume();
    eprintln!("two concurrent checks with the registry hanging: {took:?}; the next call: {then:?}");
    assert!(took < Duration::from_secs(9), "checks merged: {took:?}");
    assert!(
        then < Duration::from_secs(2),
        "failure remembered: {then:?}"
    );
    assert_eq!(
        node.records.get(id).expect("record").provenance,
        Provenance::Anonymous
    );
    kubelet.remove_sandbox(&sandbox).await;
}

/// Finding 4: a registry that no longer has the old manifest (garbage
/// collected after the tag moved) answers 404 anonymously: the repository is
/// still public, and the image must not turn private for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_image_whose_manifest_was_deleted_stays_public() {
    let node = PublicImage::start().await;
    let mut kubelet = node.proxy.kubelet().await;
    let (pod, sandbox) = node.run_anonymously(&mut kubelet, "p").await;
    let id = node.app.config_digest.as_str();
    let image = node.app.reference.as_str();
    blocking(|| delete_manifest(&node.registry, "pub/app", &node.app.digest, ALICE))
        .expect("delete the manifest");

    tokio::time::sleep(TTL + Duration::from_millis(500)).await;
    let restarted = kubelet
        .create_container(&pod, &sandbox, "restart", id, image)
        .await;
    assert!(
        restarted.is_ok(),
        "a public image turned private because its old manifest is gone: {restarted:?}"
    );
    assert_eq!(
        node.records.get(id).expect("record").provenance,
        Provenance::Anonymous
    );

    // A repository that does turn private is still noticed.
    node.registry
        .set_grants(&[Grant::new(ALICE.0, "pub/app", &["pull", "push"])]);
    tokio::time::sleep(TTL + Duration::from_millis(500)).await;
    let c = node
        .cluster
        .add_pod("other", "c", &[(image, "IfNotPresent")], None)
        .await;
    let sc = kubelet.run_sandbox(&c).await;
    assert_status(
        kubelet.create_container(&c, &sc, "app", id, image).await,
        Code::FailedPrecondition,
        &["other/c", "no verification"],
    );
    let _ = &node.containerd;
    for s in [&sandbox, &sc] {
        kubelet.remove_sandbox(s).await;
    }
}

/// Finding 8: a spec image without tag (`registry/app`) is `:latest`, as
/// the kubelet asks for it: a pod using it is a user of `registry/app:latest`,
/// so the image is hidden from it until it presents its credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tagless_spec_image_is_its_latest_tag() {
    let registry = blocking(|| Registry::start_basic_auth(&[ALICE, BOB])).expect("registry");
    let app =
        blocking(|| build_and_push_image(&registry, "team/app", "latest", ALICE)).expect("app");
    let containerd = blocking(|| Containerd::start_with(&[&registry])).expect("containerd");
    let cluster = Cluster::start().await;
    let state = tempfile::tempdir().expect("state");
    let (records, _) = open_records(state.path());
    let (inspector, _) = guard(
        GuardPolicy::default(),
        &records,
        &verifier(&[&registry]),
        cluster.pod_index(),
        cluster.event_sink(),
    );
    let proxy = Proxy::start(containerd.cri_socket(), inspector).await;
    let mut kubelet = proxy.kubelet().await;
    let latest = app.reference.as_str();
    let tagless = app.repository.as_str();
    let a = cluster
        .add_pod(
            "team",
            "alice",
            &[(latest, "IfNotPresent")],
            Some(auth(ALICE.0, ALICE.1)),
        )
        .await;
    let sa = kubelet.run_sandbox(&a).await;
    kubelet
        .start_container_of(&a, &sa, "app", latest, "IfNotPresent")
        .await
        .expect("alice");
    let b = cluster
        .add_pod(
            "other",
            "bob",
            &[(tagless, "IfNotPresent")],
            Some(auth(BOB.0, BOB.1)),
        )
        .await;
    let sb = kubelet.run_sandbox(&b).await;
    // The kubelet asks for the spec image with `:latest` added.
    let bob = kubelet
        .start_container_of(&b, &sb, "app", latest, "IfNotPresent")
        .await;
    assert!(
        bob.is_ok(),
        "bob, whose spec names {tagless}, never got to present his credentials: {bob:?}"
    );
    for sandbox in [&sa, &sb] {
        kubelet.remove_sandbox(sandbox).await;
    }
}

/// Finding 9: a sandbox without uid is still of its namespace, whose policy
/// override applies (it can hold no verification of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_without_uid_is_judged_by_its_namespace() {
    let containerd = blocking(Containerd::start).expect("containerd");
    let cluster = Cluster::start().await;
    let state = tempfile::tempdir().expect("state");
    let (records, _) = open_records(state.path());
    let policy = GuardPolicy {
        namespaces: [("strict".to_owned(), VerifyPolicy::AlwaysVerify)].into(),
        ..GuardPolicy::default()
    };
    let registry = blocking(|| Registry::start_basic_auth(&[ALICE])).expect("registry");
    let (inspector, _) = guard(
        policy,
        &records,
        &verifier(&[&registry]),
        cluster.pod_index(),
        cluster.event_sink(),
    );
    let proxy = Proxy::start(containerd.cri_socket(), inspector).await;
    let mut kubelet = proxy.kubelet().await;
    let pause = credlet_test_util::PAUSE_IMAGE;
    let id = containerd.pause_image_id();
    let unnamed = |namespace: &str| TestPod {
        namespace: namespace.into(),
        name: "nouid".into(),
        uid: String::new(),
        auth: None,
    };
    let relaxed = unnamed("relaxed");
    let s_relaxed = kubelet.run_sandbox(&relaxed).await;
    kubelet
        .create_container(&relaxed, &s_relaxed, "pause", id, pause)
        .await
        .expect("a preloaded image under the default policy");
    let strict = unnamed("strict");
    let s_strict = kubelet.run_sandbox(&strict).await;
    let created = kubelet
        .create_container(&strict, &s_strict, "pause", id, pause)
        .await;
    assert!(
        created.is_err(),
        "a sandbox without uid escaped its namespace's AlwaysVerify: {created:?}"
    );
    assert_status(
        created,
        Code::FailedPrecondition,
        &["strict/nouid", "no verification"],
    );
    for sandbox in [&s_relaxed, &s_strict] {
        kubelet.remove_sandbox(sandbox).await;
    }
}

/// Finding 9: when the runtime refuses the guard's own `ImageStatus` (an
/// ambiguous short image id), the caller gets the runtime's code and
/// message, not `Unavailable` (which would say "try again").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_errors_of_the_guards_lookups_keep_their_code() {
    let registry = blocking(|| Registry::start_basic_auth(&[ALICE])).expect("registry");
    let containerd = blocking(|| Containerd::start_with(&[&registry])).expect("containerd");
    let mut direct = Kubelet::connect(containerd.cri_socket()).await;
    // Images until two ids share their first hex digit.
    let mut ids = vec![containerd.pause_image_id().to_owned()];
    let prefix = loop {
        let n = ids.len();
        let pushed =
            blocking(|| build_and_push_image(&registry, "team/app", &format!("v{n}"), ALICE))
                .expect("push");
        direct
            .pull_with(&pushed.reference, None, Some(auth(ALICE.0, ALICE.1)))
            .await
            .expect("pull");
        let first = |id: &str| id.strip_prefix("sha256:").expect("sha256")[..1].to_owned();
        let digit = first(&pushed.config_digest);
        if ids.iter().any(|id| first(id) == digit) {
            break format!("sha256:{digit}");
        }
        ids.push(pushed.config_digest);
        assert!(ids.len() < 20, "no shared prefix");
    };
    let runtime = direct.image_status(&prefix).await.expect_err("ambiguous");
    eprintln!("the runtime's ImageStatus({prefix}): {runtime:?}");

    let cluster = Cluster::start().await;
    let state = tempfile::tempdir().expect("state");
    let (records, _) = open_records(state.path());
    let (inspector, _) = guard(
        GuardPolicy::default(),
        &records,
        &verifier(&[&registry]),
        cluster.pod_index(),
        cluster.event_sink(),
    );
    let proxy = Proxy::start(containerd.cri_socket(), inspector).await;
    let mut kubelet = proxy.kubelet().await;
    let p = cluster
        .add_pod("team", "p", &[(prefix.as_str(), "IfNotPresent")], None)
        .await;
    let sandbox = kubelet.run_sandbox(&p).await;
    let created = kubelet
        .create_container(&p, &sandbox, "app", &prefix, &prefix)
        .await;
    let created = created.expect_err("ambiguous");
    assert_eq!(
        created.code(),
        runtime.code(),
        "CreateContainer of an ambiguous short id: {created:?}"
    );
    assert!(created.message().contains(runtime.message()), "{created:?}");
    let pulled = kubelet.pull(&prefix, &p).await.expect_err("ambiguous");
    assert_eq!(pulled.code(), runtime.code(), "PullImage: {pulled:?}");
    kubelet.remove_sandbox(&sandbox).await;
}

/// Finding 3: where the runtime restores checkpoints through
/// `CreateContainer` (containerd 2.x, CRI-O with CRIU support), a checkpoint
/// image runs the image its checkpoint names, which the guard never judges,
/// so the guard refuses checkpoint images there. containerd shows an image's
/// manifest annotations only through its own API on the same socket: this
/// reads a checkpoint image's from a real containerd (1.6 here, which
/// itself never restores through `CreateContainer`, so its guard does not
/// ask).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_shows_whether_an_image_is_a_checkpoint() {
    use credlet_imageguard::decide::{CHECKPOINT_ANNOTATION, checkpoint};
    use credlet_imageguard::guard::containerd_manifest_annotations;
    use credlet_imageguard::proxy::Upstream;
    let registry = blocking(|| Registry::start_basic_auth(&[ALICE])).expect("registry");
    let mut spec = ImageSpec::runnable("checkpoint").expect("spec");
    spec.annotations
        .insert(CHECKPOINT_ANNOTATION.into(), "counter".into());
    let marked =
        blocking(|| push_image(&registry, "team/checkpoint", "v1", ALICE, &spec)).expect("push");
    let plain =
        blocking(|| build_and_push_image(&registry, "team/app", "v1", ALICE)).expect("push");
    let containerd = blocking(|| Containerd::start_with(&[&registry])).expect("containerd");
    let mut direct = Kubelet::connect(containerd.cri_socket()).await;
    let upstream = Upstream::new(containerd.cri_socket(), 1);
    for (image, is_checkpoint) in [(&marked, true), (&plain, false)] {
        let id = direct
            .pull_with(&image.reference, None, Some(auth(ALICE.0, ALICE.1)))
            .await
            .expect("pull");
        let annotations = containerd_manifest_annotations(&upstream, &id)
            .await
            .expect("containerd's own API");
        assert_eq!(
            annotations.contains_key(CHECKPOINT_ANNOTATION),
            is_checkpoint,
            "{}: {annotations:?}",
            image.reference
        );
        assert_eq!(
            checkpoint(&id, &[&annotations]).is_some(),
            is_checkpoint,
            "{}",
            image.reference
        );
    }
    // An image containerd does not have: nothing to read, and no error
    // that would pass for "not a checkpoint".
    let missing =
        containerd_manifest_annotations(&upstream, &format!("sha256:{}", "0".repeat(64))).await;
    assert!(missing.is_err(), "{missing:?}");
}
