//! The signer end to end against the fake API server over HTTP with the
//! real kube client: requests made like the kubelet makes them, answered by
//! the controller under leader election, checked field by field; the
//! published ClusterTrustBundle verifies the chains. Issuance for every key
//! type, with keys and requests the kubelet makes and answers the API
//! server checks, runs against a real cluster (tests/tests/kubernetes.rs);
//! here are the faults and races a real API server does not make on demand.

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use credlet_signer::SignerMetrics;
use credlet_signer::metrics::Outcome;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use serde_json::{Value, json};
use support::*;

fn time(value: &Value, pointer: &str) -> i64 {
    let text = value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{pointer} missing in {value}"));
    text.parse::<k8s_openapi::jiff::Timestamp>()
        .unwrap_or_else(|e| panic!("{pointer} {text:?}: {e}"))
        .as_second()
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Verifies `chain_pem` (leaf first) against the roots of the published
/// ClusterTrustBundle with rustls' WebPKI verifier, for client auth (pod
/// certificates carry a SPIFFE URI, not necessarily a DNS name).
fn verify_against_bundle(chain_pem: &str, bundle_pem: &str) -> anyhow::Result<()> {
    let mut roots = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        roots.add(root?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(chain_pem.as_bytes()).collect::<Result<_, _>>()?;
    let (leaf, intermediates) = chain.split_first().ok_or(anyhow::anyhow!("empty chain"))?;
    verifier.verify_client_cert(leaf, intermediates, UnixTime::now())?;
    Ok(())
}

/// Checks an Issued status field by field.
fn check_issued(
    cluster: &Cluster,
    request: &RequestBuilder,
    stored: &Value,
) -> anyhow::Result<credlet_ca::CertificateInfo> {
    let conditions = stored
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .expect("conditions");
    assert_eq!(conditions.len(), 1, "exactly one condition: {stored}");
    let c = &conditions[0];
    assert_eq!(c["type"], "Issued", "{:?}: {c}", request.key.kind);
    assert_eq!(c["status"], "True");
    assert_eq!(c["reason"], "Issued");
    assert!(c["lastTransitionTime"].is_string() && c["message"].is_string());
    let chain = stored
        .pointer("/status/certificateChain")
        .and_then(Value::as_str)
        .expect("chain");
    let leaf = credlet_ca::inspect_leaf(chain)?;
    assert_eq!(
        leaf.public_key_der, request.key.spki,
        "the leaf certifies the request's key ({:?})",
        request.key.kind
    );
    assert_eq!(
        leaf.uris,
        [format!(
            "spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}",
            request.namespace, request.service_account
        )]
    );
    let (nb, na) = (unix(leaf.not_before), unix(leaf.not_after));
    assert_eq!(time(stored, "/status/notBefore"), nb);
    assert_eq!(time(stored, "/status/notAfter"), na);
    let refresh = time(stored, "/status/beginRefreshAt");
    assert!(
        refresh >= nb + 600 && refresh <= na - 600,
        "beginRefreshAt {refresh} outside [{nb}+10min, {na}-10min]"
    );
    assert!(
        na - nb <= request.max_expiration_seconds,
        "lifetime {}",
        na - nb
    );
    assert!(na - nb >= 3600, "lifetime {}", na - nb);
    let bundle = cluster.bundle().expect("bundle published");
    verify_against_bundle(
        chain,
        bundle
            .pointer("/spec/trustBundle")
            .and_then(Value::as_str)
            .expect("trustBundle"),
    )?;
    Ok(leaf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_carry_the_reason_and_an_event() -> anyhow::Result<()> {
    let cluster = Cluster::new()?;
    let metrics = SignerMetrics::default();
    cluster.add_node("node-b")?;
    let mut cases: Vec<(RequestBuilder, &str)> = Vec::new();

    let mut r = cluster.pod_with_request("ns1", "tampered", KeyKind::P256)?;
    r.tamper_proof = true;
    cases.push((r, "InvalidProofOfPossession"));

    let mut r = cluster.pod_with_request("ns1", "wrong-pod-uid", KeyKind::P256)?;
    r.pod_uid = "0b7d3c36-7ad9-4cf1-9f0c-3d5a7c1f2e10".into();
    cases.push((r, "PodUIDMismatch"));

    let mut r = cluster.pod_with_request("ns1", "wrong-sa-uid", KeyKind::P256)?;
    r.service_account_uid = "1b7d3c36-7ad9-4cf1-9f0c-3d5a7c1f2e10".into();
    cases.push((r, "ServiceAccountUIDMismatch"));

    let mut r = cluster.pod_with_request("ns1", "wrong-node-uid", KeyKind::P256)?;
    r.node_uid = "2b7d3c36-7ad9-4cf1-9f0c-3d5a7c1f2e10".into();
    cases.push((r, "NodeUIDMismatch"));

    // The pod runs on node-a; the request claims node-b (with node-b's UID).
    let node_b_uid = cluster
        .server
        .get("v1", "Node", None, "node-b")
        .and_then(|n| n.pointer("/metadata/uid")?.as_str().map(str::to_owned))
        .expect("node-b");
    let mut r = cluster.pod_with_request("ns1", "elsewhere", KeyKind::P256)?;
    r.node = "node-b".into();
    r.node_uid = node_b_uid;
    cases.push((r, "PodNotOnNode"));

    let r = cluster.pod_with_request("ns1", "deleted", KeyKind::P256)?;
    cluster.server.delete_pod("ns1", "deleted")?;
    cases.push((r, "PodNotFound"));

    let mut r = cluster.pod_with_request("ns1", "no-sa", KeyKind::P256)?;
    cluster
        .server
        .delete("v1", "ServiceAccount", Some("ns1"), "no-sa-sa")?;
    r.max_expiration_seconds = 7200;
    cases.push((r, "ServiceAccountNotFound"));

    // The request names a real service account, but not the pod's.
    let mut r = cluster.pod_with_request("ns1", "other-sa", KeyKind::P256)?;
    r.service_account = "spare".into();
    r.service_account_uid = cluster.add_service_account("ns1", "spare")?;
    cases.push((r, "PodServiceAccountMismatch"));

    // The pod is bound to a node that does not exist (any more).
    let mut r = cluster.pod_with_request("ns1", "ghost-node", KeyKind::P256)?;
    cluster.server.delete_pod("ns1", "ghost-node")?;
    r.pod_uid = cluster.add_pod("ns1", "ghost-node", "ghost-node-sa", "node-gone")?;
    r.node = "node-gone".into();
    r.node_uid = "3b7d3c36-7ad9-4cf1-9f0c-3d5a7c1f2e10".into();
    cases.push((r, "NodeNotFound"));

    let mut r = cluster.pod_with_request("ns1", "annotated", KeyKind::P256)?;
    r.annotations = vec![("example.com/unknown".into(), "x".into())];
    cases.push((r, "InvalidUnverifiedUserAnnotations"));

    let mut r = cluster.pod_with_request("ns1", "bad-dns", KeyKind::P256)?;
    r.annotations = vec![("credlet.io/dns-names".into(), "evil.example.com".into())];
    cases.push((r, "DNSNameNotAllowed"));

    let r = cluster.pod_with_request("ns1", "rsa2048", KeyKind::Rsa2048)?;
    cases.push((r, "UnsupportedKeyType"));

    // Another signer's request: untouched.
    let mut other = cluster.pod_with_request("ns1", "other-signer", KeyKind::P256)?;
    other.signer = "example.com/other".into();
    cluster.create(&other)?;

    for (request, _) in &cases {
        cluster.create(request)?;
    }
    let signer = cluster
        .start(cluster.settings("ca-0"), metrics.clone())
        .await?;
    for (request, reason) in &cases {
        let stored = cluster.answered(&request.namespace, &request.name).await?;
        assert_eq!(
            condition(&stored),
            Some(("Denied".to_owned(), (*reason).to_owned())),
            "{}: {stored}",
            request.name
        );
        let conditions = stored["status"]["conditions"].as_array().expect("list");
        assert_eq!(conditions.len(), 1);
        assert!(
            !conditions[0]["message"]
                .as_str()
                .unwrap_or_default()
                .is_empty(),
            "a denial explains itself"
        );
        assert!(stored.pointer("/status/certificateChain").is_none());
        wait_for(reason, Duration::from_secs(5), || {
            metrics.answered_for(SIGNER, Outcome::Denied, reason) == 1
        })
        .await?;
    }
    // One Warning Event per denial, regarding the request, reason = the
    // denial reason.
    wait_for("the denial events", Duration::from_secs(10), || {
        cluster.server.events().len() >= cases.len()
    })
    .await?;
    for (request, reason) in &cases {
        let events: Vec<Value> = cluster
            .server
            .events()
            .into_iter()
            .filter(|e| e["regarding"]["name"] == json!(request.name))
            .collect();
        assert_eq!(events.len(), 1, "{}: {events:?}", request.name);
        assert_eq!(events[0]["reason"], json!(reason));
        assert_eq!(events[0]["type"], "Warning");
        assert_eq!(events[0]["regarding"]["kind"], "PodCertificateRequest");
        assert_eq!(events[0]["reportingController"], "credlet.io/signer");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let untouched = cluster.request("ns1", "req-other-signer").expect("exists");
    assert!(untouched.get("status").is_none(), "{untouched}");
    assert_eq!(cluster.status_writes("ns1", "req-other-signer"), 0);
    signer.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_does_not_answer_again() -> anyhow::Result<()> {
    let cluster = Cluster::new()?;
    let issued = cluster.pod_with_request("ns", "web", KeyKind::P256)?;
    let mut denied = cluster.pod_with_request("ns", "bad", KeyKind::P256)?;
    denied.tamper_proof = true;
    cluster.create(&issued)?;
    cluster.create(&denied)?;
    let first = cluster
        .start(cluster.settings("ca-0"), SignerMetrics::default())
        .await?;
    let issued_before = cluster.answered("ns", "req-web").await?;
    let denied_before = cluster.answered("ns", "req-bad").await?;
    first.shutdown().await?;

    let metrics = SignerMetrics::default();
    let second = cluster
        .start(cluster.settings("ca-1"), metrics.clone())
        .await?;
    wait_for("the new replica to lead", Duration::from_secs(10), || {
        second.leadership().is_leading()
    })
    .await?;
    // The restarted controller has listed both; give it time to misbehave.
    let fresh = cluster.pod_with_request("ns", "later", KeyKind::P256)?;
    cluster.create(&fresh)?;
    cluster.answered("ns", "req-later").await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(cluster.request("ns", "req-web"), Some(issued_before));
    assert_eq!(cluster.request("ns", "req-bad"), Some(denied_before));
    assert_eq!(cluster.status_writes("ns", "req-web"), 1);
    assert_eq!(cluster.status_writes("ns", "req-bad"), 1);
    assert_eq!(metrics.answered_for(SIGNER, Outcome::Issued, "Issued"), 1);
    second.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_answer_each_request_once_and_the_survivor_takes_over() -> anyhow::Result<()> {
    let cluster = Cluster::new()?;
    let a = cluster
        .start(cluster.settings("ca-a"), SignerMetrics::default())
        .await?;
    let b = cluster
        .start(cluster.settings("ca-b"), SignerMetrics::default())
        .await?;
    wait_for("a leader", Duration::from_secs(10), || {
        a.leadership().is_leading() || b.leadership().is_leading()
    })
    .await?;
    assert!(
        !(a.leadership().is_leading() && b.leadership().is_leading()),
        "two leaders"
    );
    let mut names = Vec::new();
    for i in 0..20 {
        let request = cluster.pod_with_request("ns", &format!("p{i}"), KeyKind::P256)?;
        cluster.create(&request)?;
        names.push(request.name);
    }
    for name in &names {
        let stored = cluster.answered("ns", name).await?;
        assert_eq!(condition(&stored).map(|c| c.0).as_deref(), Some("Issued"));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for name in &names {
        assert_eq!(cluster.status_writes("ns", name), 1, "{name}");
    }

    // Kill the leader without releasing the Lease: the other replica takes
    // over once the Lease has expired.
    let (leader, survivor) = if a.leadership().is_leading() {
        (a, b)
    } else {
        (b, a)
    };
    let killed_at = tokio::time::Instant::now();
    drop(leader);
    let late = cluster.pod_with_request("ns", "late", KeyKind::P256)?;
    cluster.create(&late)?;
    wait_for("the survivor to lead", Duration::from_secs(10), || {
        survivor.leadership().is_leading()
    })
    .await?;
    assert!(
        killed_at.elapsed() >= Duration::from_millis(1800),
        "took over after {:?}, before the 2 s Lease expired",
        killed_at.elapsed()
    );
    let stored = cluster.answered("ns", "req-late").await?;
    assert_eq!(condition(&stored).map(|c| c.0).as_deref(), Some("Issued"));
    assert_eq!(cluster.status_writes("ns", "req-late"), 1);
    survivor.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_lease_is_taken_over_at_once() -> anyhow::Result<()> {
    let cluster = Cluster::new()?;
    let mut slow = cluster.settings("ca-b");
    if let Some(lease) = &mut slow.lease {
        lease.lease_duration = std::time::Duration::from_secs(30);
        lease.renew_deadline = std::time::Duration::from_secs(20);
    }
    let a = cluster
        .start(cluster.settings("ca-a"), SignerMetrics::default())
        .await?;
    wait_for("ca-a to lead", Duration::from_secs(10), || {
        a.leadership().is_leading()
    })
    .await?;
    let b = cluster.start(slow, SignerMetrics::default()).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!b.leadership().is_leading());
    let released_at = tokio::time::Instant::now();
    a.shutdown().await?;
    assert_lease_released(&cluster);
    wait_for("ca-b to lead", Duration::from_secs(5), || {
        b.leadership().is_leading()
    })
    .await?;
    assert!(released_at.elapsed() < Duration::from_secs(2));
    b.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_cannot_renew_stops_writing() -> anyhow::Result<()> {
    let cluster = Cluster::new()?;
    let a = cluster
        .start(cluster.settings("ca-a"), SignerMetrics::default())
        .await?;
    wait_for("ca-a to lead", Duration::from_secs(10), || {
        a.leadership().is_leading()
    })
    .await?;
    // Every Lease call fails from now on.
    cluster.server.fail_requests("*", "/leases/", 10_000, 500);
    let cut_at = tokio::time::Instant::now();
    wait_for("ca-a to step down", Duration::from_secs(5), || {
        !a.leadership().is_leading()
    })
    .await?;
    // At the renew deadline (1.5 s after the last renewal started), well
    // before the 2 s Lease could expire for another replica.
    assert!(
        cut_at.elapsed() <= Duration::from_millis(1600),
        "{:?}",
        cut_at.elapsed()
    );
    let request = cluster.pod_with_request("ns", "orphan", KeyKind::P256)?;
    cluster.create(&request)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(cluster.status_writes("ns", "req-orphan"), 0);
    drop(a);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_status_errors_are_retried() -> anyhow::Result<()> {
    let cluster = Cluster::new()?;
    cluster
        .server
        .fail_requests("PUT", "podcertificaterequests/req-flaky/status", 2, 500);
    let request = cluster.pod_with_request("ns", "flaky", KeyKind::Ed25519)?;
    cluster.create(&request)?;
    let metrics = SignerMetrics::default();
    let signer = cluster
        .start(cluster.settings("ca-0"), metrics.clone())
        .await?;
    let stored = cluster.answered("ns", "req-flaky").await?;
    assert_eq!(condition(&stored).map(|c| c.0).as_deref(), Some("Issued"));
    assert!(
        metrics.api_retries.get() >= 2,
        "{:?}",
        cluster
            .server
            .requests()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    );
    signer.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_answered_by_someone_else_meanwhile_is_left_alone() -> anyhow::Result<()> {
    let cluster = Cluster::new()?;
    let request = cluster.pod_with_request("ns", "raced", KeyKind::P256)?;
    cluster.create(&request)?;
    // Hold the controller's pod lookup while another writer denies it.
    cluster
        .server
        .delay_requests("GET", "/pods/raced", 1, Duration::from_millis(800));
    let metrics = SignerMetrics::default();
    let signer = cluster
        .start(cluster.settings("ca-0"), metrics.clone())
        .await?;
    // The node GET goes out together with the (delayed) pod GET.
    wait_for("the identity lookups", Duration::from_secs(10), || {
        cluster
            .server
            .requests()
            .iter()
            .any(|r| r.path == "/api/v1/nodes/node-a")
    })
    .await?;
    let mut other = cluster.request("ns", "req-raced").expect("exists");
    other["status"] = json!({"conditions": [{
        "type": "Denied", "status": "True", "reason": "ByAnotherSigner",
        "message": "answered elsewhere", "lastTransitionTime": "2026-01-01T00:00:00Z",
    }]});
    cluster.server.update(&other)?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stored = cluster.request("ns", "req-raced").expect("exists");
    assert_eq!(
        condition(&stored),
        Some(("Denied".to_owned(), "ByAnotherSigner".to_owned())),
        "{stored}"
    );
    assert_eq!(metrics.answered_for(SIGNER, Outcome::Issued, "Issued"), 0);
    // The controller's write met a 409 and was not repeated.
    let conflicts = cluster
        .server
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/req-raced/status") && r.method == "PUT")
        .map(|r| r.status)
        .collect::<Vec<_>>();
    assert_eq!(conflicts, [409]);
    signer.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundle_follows_ca_rotation_and_is_repaired() -> anyhow::Result<()> {
    let cluster = Cluster::new()?;
    let metrics = SignerMetrics::default();
    let signer = cluster
        .start(cluster.settings("ca-0"), metrics.clone())
        .await?;
    let roots = |bundle: &Value| -> usize {
        bundle["spec"]["trustBundle"]
            .as_str()
            .map(|pem| CertificateDer::pem_slice_iter(pem.as_bytes()).count())
            .unwrap_or(0)
    };
    wait_for("the bundle", Duration::from_secs(10), || {
        cluster.bundle().is_some_and(|b| roots(&b) == 1)
    })
    .await?;
    let bundle = cluster.bundle().expect("bundle");
    assert_eq!(bundle["spec"]["signerName"], SIGNER);
    let old_root = cluster.keys.trust_bundle().roots_der[0].clone();

    // Rotation: the bundle carries the new and the old root.
    cluster.rotate_ca()?;
    wait_for("both roots", Duration::from_secs(10), || {
        cluster.bundle().is_some_and(|b| roots(&b) == 2)
    })
    .await?;
    let pem = cluster.bundle().expect("bundle")["spec"]["trustBundle"]
        .as_str()
        .expect("pem")
        .to_owned();
    let ders: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()?;
    assert!(ders.contains(&old_root));
    assert_eq!(ders, cluster.keys.trust_bundle().roots_der);

    // A certificate issued after the rotation chains to the new root in
    // the published bundle.
    let request = cluster.pod_with_request("ns", "after-rotation", KeyKind::P384)?;
    cluster.create(&request)?;
    let stored = cluster.answered("ns", "req-after-rotation").await?;
    check_issued(&cluster, &request, &stored)?;

    // Someone edits the bundle: repaired at the next resync.
    let mut edited = cluster.bundle().expect("bundle");
    edited["spec"]["trustBundle"] = json!(STANDARD.encode("garbage"));
    cluster.server.update(&edited)?;
    wait_for("the repair", Duration::from_secs(5), || {
        cluster
            .bundle()
            .is_some_and(|b| b["spec"]["trustBundle"] == json!(pem))
    })
    .await?;
    // Deleted: re-created.
    cluster.server.delete(
        CTB_API,
        "ClusterTrustBundle",
        None,
        "credlet.io:pods:credlet",
    )?;
    wait_for("the re-creation", Duration::from_secs(5), || {
        cluster.bundle().is_some()
    })
    .await?;
    signer.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_name_the_outcomes() -> anyhow::Result<()> {
    let cluster = Cluster::new()?;
    let metrics = SignerMetrics::default();
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let ok = cluster.pod_with_request("ns", "ok", KeyKind::P256)?;
    let mut bad = cluster.pod_with_request("ns", "bad", KeyKind::P256)?;
    bad.annotations = vec![("x/y".into(), "z".into())];
    cluster.create(&ok)?;
    cluster.create(&bad)?;
    let signer = cluster
        .start(cluster.settings("ca-0"), metrics.clone())
        .await?;
    cluster.answered("ns", "req-ok").await?;
    cluster.answered("ns", "req-bad").await?;
    wait_for("a publication", Duration::from_secs(5), || {
        cluster.bundle().is_some()
    })
    .await?;
    let needles = [
        r#"credlet_signer_requests_total{signer="credlet.io/pods",outcome="Issued",reason="Issued"} 1"#,
        r#"credlet_signer_requests_total{signer="credlet.io/pods",outcome="Denied",reason="InvalidUnverifiedUserAnnotations"} 1"#,
        "credlet_signer_leader 1",
        "credlet_signer_issue_latency_seconds_count 1",
        r#"credlet_signer_trust_bundle_publications_total{signer="credlet.io/pods",result="Created"} 1"#,
    ];
    // Counted right after the writes the test saw.
    let complete = || {
        let text = credlet_signer::metrics::encode(&registry);
        needles.iter().all(|n| text.contains(n))
    };
    if wait_for("the metrics", Duration::from_secs(5), complete)
        .await
        .is_err()
    {
        let text = credlet_signer::metrics::encode(&registry);
        let missing: Vec<_> = needles.iter().filter(|n| !text.contains(*n)).collect();
        panic!("missing {missing:?}:\n{text}");
    }
    signer.shutdown().await?;
    let text = credlet_signer::metrics::encode(&registry);
    assert!(text.contains("credlet_signer_leader 0"), "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_prefers_v1_when_served() -> anyhow::Result<()> {
    let cluster = Cluster::new()?;
    let client = cluster.server.kube_client()?;
    // The fake server serves both versions, as 1.37 will.
    assert_eq!(
        credlet_signer::controller::discover(&client, Duration::from_secs(5)).await?,
        credlet_signer::request::ApiVersion::V1
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_requests_with_a_stub_csr_are_issued_when_discovery_finds_v1() -> anyhow::Result<()> {
    let cluster = Cluster::new()?;
    let mut settings = cluster.settings("ca-0");
    settings.signer.api_version = credlet_signer::ApiVersionChoice::Auto;
    let signer = cluster.start(settings, SignerMetrics::default()).await?;
    // A 1.37 kubelet: certificates.k8s.io/v1, stubPKCS10Request only.
    let request = cluster.pod_with_request("ns", "ga", KeyKind::P256)?;
    let key = credlet_ca::PrivateKey::generate(credlet_ca::KeyType::EcdsaP256)?;
    let mut json = request.json();
    json["apiVersion"] = json!("certificates.k8s.io/v1");
    let spec = json["spec"].as_object_mut().expect("spec");
    spec.remove("pkixPublicKey");
    spec.remove("proofOfPossession");
    spec.insert(
        "stubPKCS10Request".into(),
        json!(STANDARD.encode(key.certificate_signing_request()?)),
    );
    cluster.server.create(&json)?;
    let path = "/apis/certificates.k8s.io/v1/namespaces/ns/podcertificaterequests/req-ga/status";
    wait_for("the v1 answer", Duration::from_secs(10), || {
        cluster
            .server
            .get(
                "certificates.k8s.io/v1",
                "PodCertificateRequest",
                Some("ns"),
                "req-ga",
            )
            .is_some_and(|r| condition(&r).is_some())
    })
    .await?;
    let stored = cluster
        .server
        .get(
            "certificates.k8s.io/v1",
            "PodCertificateRequest",
            Some("ns"),
            "req-ga",
        )
        .expect("stored");
    assert_eq!(
        condition(&stored),
        Some(("Issued".to_owned(), "Issued".to_owned())),
        "{stored}"
    );
    let chain = stored["status"]["certificateChain"]
        .as_str()
        .expect("chain");
    let leaf = credlet_ca::inspect_leaf(chain)?;
    assert_eq!(leaf.public_key_der, key.public_key_der());
    assert_eq!(
        cluster
            .server
            .requests()
            .iter()
            .filter(|r| r.path == path && r.method == "PUT" && r.status == 200)
            .count(),
        1
    );
    signer.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_cannot_sign_the_lifetime_fails_the_request() -> anyhow::Result<()> {
    let cluster = Cluster::new()?;
    // The CA expires in 2 h; the request wants a day (at least 1 h is
    // always issued, so this is the signer's fault, not the requester's).
    cluster.install_short_lived_ca(Duration::from_secs(7200))?;
    let request = cluster.pod_with_request("ns", "doomed", KeyKind::P256)?;
    cluster.create(&request)?;
    let metrics = SignerMetrics::default();
    let signer = cluster
        .start(cluster.settings("ca-0"), metrics.clone())
        .await?;
    let stored = cluster.answered("ns", "req-doomed").await?;
    assert_eq!(
        condition(&stored),
        Some(("Failed".to_owned(), "SigningFailed".to_owned())),
        "{stored}"
    );
    let message = stored["status"]["conditions"][0]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.contains("outside the CA certificate's validity"),
        "{message}"
    );
    assert!(stored.pointer("/status/certificateChain").is_none());
    wait_for("the failure event", Duration::from_secs(5), || {
        cluster
            .server
            .events()
            .iter()
            .any(|e| e["reason"] == "SigningFailed" && e["regarding"]["name"] == "req-doomed")
    })
    .await?;
    wait_for("the failure count", Duration::from_secs(5), || {
        metrics.answered_for(SIGNER, Outcome::Failed, "SigningFailed") == 1
    })
    .await?;
    signer.shutdown().await?;
    Ok(())
}

/// SIGTERM does not wait for a Lease request the API server is slow to
/// answer: the campaign stops at once and the release settles the Lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_slow_lease_request() -> anyhow::Result<()> {
    let cluster = Cluster::new()?;
    let mut settings = cluster.settings("ca-a");
    if let Some(lease) = &mut settings.lease {
        lease.lease_duration = Duration::from_secs(30);
        lease.renew_deadline = Duration::from_secs(20);
        lease.retry_period = Duration::from_millis(200);
    }
    let a = cluster.start(settings, SignerMetrics::default()).await?;
    wait_for("ca-a to lead", Duration::from_secs(10), || {
        a.leadership().is_leading()
    })
    .await?;
    // The next renewal hangs for 15 s at the API server.
    cluster
        .server
        .delay_requests("PUT", "/leases/credlet-signer", 1, Duration::from_secs(15));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let started = tokio::time::Instant::now();
    a.shutdown().await?;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "shutdown waited {took:?} for a Lease request in flight"
    );
    assert_lease_released(&cluster);
    Ok(())
}

/// The signer's Lease has no holder (released).
fn assert_lease_released(cluster: &Cluster) {
    let lease = cluster
        .server
        .get(
            "coordination.k8s.io/v1",
            "Lease",
            Some("credlet"),
            "credlet-signer",
        )
        .expect("lease");
    assert!(
        lease
            .pointer("/spec/holderIdentity")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty),
        "released: {lease}"
    );
}
