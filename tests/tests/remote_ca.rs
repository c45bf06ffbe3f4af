//! `credlet ca` and `credlet agent` as real processes (both the
//! `credlet-under-test` binary) talking gRPC over real rustls TLS 1.3 mutual
//! TLS on 127.0.0.1. The in-process fake Kubernetes API server answers the
//! CA's TokenReviews and pod GETs over real HTTP (both processes get a
//! kubeconfig file for it); the test plays the kubelet over the agent's CSI
//! socket, and the agent mounts real tmpfs volumes (needs root).
//!
//! Covered: readiness only with the agent's own client certificate, pod
//! certificates from verified tokens, a token of another pod refused, CA
//! rollover reaching every volume's `ca.crt` without re-issuing, a broken CA
//! key file, the CA process gone (with the agent's /readyz and CA client
//! metrics showing it), volume templates and SPIFFE IDs expanded by the CA,
//! and SIGTERM to both processes.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Result, bail, ensure};
use credlet_ca::{inspect_leaf, verify_chain};
use credlet_tests::cluster::{
    CA_TIMEOUT, CaProcess, Cluster, NODE, agent_command, new_root, tokens_json, write_atomically,
};
use credlet_tests::harness::{
    CheckTime, Csi, TestEnv, Volume, check_volume, mount_at, read_volume, wait_until,
};
use credlet_tests::{agent_bin, free_port, http_get, metric_value};
use tonic::Code;

/// How long anything asynchronous may take (start-up, reloads, bundle
/// propagation).
const WAIT: Duration = Duration::from_secs(60);
/// How long a SIGTERMed process may take to exit.
const EXIT_WITHIN: Duration = Duration::from_secs(15);

/// Serials of the certificates in a PEM bundle, in order.
fn serials(bundle_pem: &str) -> Result<Vec<String>> {
    bundle_pem
        .split_inclusive("-----END CERTIFICATE-----")
        .filter(|block| block.contains("-----BEGIN CERTIFICATE-----"))
        .map(|block| Ok(inspect_leaf(block)?.serial_hex))
        .collect()
}

fn serial(pem: &str) -> String {
    inspect_leaf(pem).expect("certificate").serial_hex
}

/// Asserts that a failed publish left nothing behind: no mount, no target
/// directory, no volume record.
fn assert_nothing_on_disk(env: &TestEnv, volume: &Volume) {
    assert!(
        mount_at(&volume.target).is_none(),
        "{}: a mount was left",
        volume.id
    );
    assert!(
        !volume.target.exists(),
        "{}: the target directory was left",
        volume.id
    );
    assert!(
        !env.state_file(&volume.id).exists(),
        "{}: the volume record was left",
        volume.id
    );
}

fn expect_code(result: Result<(), tonic::Status>, code: Code, mention: &str) -> tonic::Status {
    match result {
        Ok(()) => panic!("expected {code:?}, the publish succeeded"),
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            assert!(
                status.message().contains(mention),
                "{:?} does not mention {mention:?}",
                status.message()
            );
            status
        }
    }
}

// --- the processes -------------------------------------------------------------

/// Waits until the agent's CSI socket answers `Probe`; returns the client
/// and the answer.
async fn connect(env: &mut TestEnv) -> (Csi, Option<bool>) {
    wait_until("the agent's CSI socket", WAIT, || {
        ensure!(env.agent_running(), "the agent exited");
        ensure!(env.socket.exists(), "no socket yet");
        Ok(())
    })
    .await;
    let csi = Csi::connect(&env.socket).await.expect("connect CSI");
    let ready = csi.probe().await.expect("Probe");
    (csi, ready)
}

async fn wait_for_log(what: &str, env: &TestEnv, offset: u64, needles: &[&str]) {
    wait_until(what, WAIT, || {
        let (log, _) = env.log_from(offset);
        match log
            .lines()
            .find(|line| needles.iter().all(|n| line.contains(n)))
        {
            Some(_) => Ok(()),
            None => bail!("no log line with {needles:?}"),
        }
    })
    .await;
}

async fn stop_cleanly(env: &mut TestEnv, what: &str) {
    let started = Instant::now();
    let status = env.stop().await;
    let took = started.elapsed();
    eprintln!("{what}: SIGTERM to exit took {took:?}");
    assert_eq!(status.code(), Some(0), "{what} after SIGTERM: {status}");
    assert!(took < EXIT_WITHIN, "{what} took {took:?} to exit");
}

// --- the tests -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_certificates_from_the_ca_process_through_rollover_bad_key_and_outage() -> Result<()> {
    let cluster = Cluster::start()?;
    let mut ca = CaProcess::new(agent_bin!(), &cluster)?;
    ca.start().await.expect("credlet ca listening");
    let agent_token = cluster.agent_pod()?;

    // The agent starts before its token is projected: it serves CSI but is
    // not ready, and a publish is refused before anything touches the disk.
    let mut agent = TestEnv::new(agent_bin!());
    let health: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut command = agent_command(&agent, &cluster, &ca);
    command.arg("--health-listen").arg(health.to_string());
    agent.spawn_command(command);
    wait_for_log(
        "the agent's first attempt at its certificate",
        &agent,
        0,
        &["could not get the agent client certificate", "agent-token"],
    )
    .await;
    let (csi, ready) = connect(&mut agent).await;
    assert_eq!(ready, Some(false), "ready without a client certificate");
    // Alive, but not ready: no client certificate, so the CA is not
    // reachable for pod certificates.
    assert_eq!(http_get(health, "/healthz")?.0, 200);
    let (code, why) = http_get(health, "/readyz")?;
    assert_eq!(code, 503, "{why}");
    assert!(why.contains("ca: no valid agent certificate"), "{why}");
    assert!(why.contains("csi:"), "{why}");
    let (early, _) = cluster.app(&agent, "early")?;
    expect_code(
        csi.publish(&early).await,
        Code::Unavailable,
        "no CA client certificate",
    );
    assert_nothing_on_disk(&agent, &early);

    // The token arrives: the agent gets its node client certificate over
    // TLS (IssueAgentCertificate, TokenReview, pod check), then is ready.
    cluster.write_agent_token(&agent_token)?;
    let csi = agent.wait_ready().await;
    assert!(
        agent.log().contains("agent client certificate from the CA"),
        "ready without the certificate being logged"
    );
    wait_for_log(
        "the CA issuing the agent certificate",
        &ca.env,
        0,
        &["agent certificate issued", NODE],
    )
    .await;

    // Ready once the trust bundle stream to the CA is open too.
    wait_until("the agent's /readyz", WAIT, || {
        let (code, why) = http_get(health, "/readyz")?;
        ensure!(code == 200, "{code}: {why}");
        Ok(())
    })
    .await;

    // A pod certificate: identity from the verified token, chained to the
    // CA's root, on a tmpfs.
    let (a, a_token) = cluster.app(&agent, "a")?;
    csi.publish(&a).await.expect("publish web-a");
    let (_, metrics) = http_get(health, "/metrics")?;
    for (series, at_least) in [
        (
            r#"credlet_ca_client_requests_total{rpc="IssueAgentCertificate",outcome="ok"}"#,
            1.0,
        ),
        (
            r#"credlet_ca_client_requests_total{rpc="IssuePodCertificate",outcome="ok"}"#,
            1.0,
        ),
        (
            r#"credlet_ca_client_requests_total{rpc="WatchTrustBundle",outcome="ok"}"#,
            1.0,
        ),
        (
            r#"credlet_csi_issuances_total{operation="Publish",outcome="Success"}"#,
            1.0,
        ),
    ] {
        let value = metric_value(&metrics, series).unwrap_or(0.0);
        assert!(value >= at_least, "{series} = {value}:\n{metrics}");
    }
    let mount = mount_at(&a.target).expect("a mount at the target");
    assert_eq!(mount.fstype, "tmpfs", "{mount:?}");
    let before = check_volume(&a.target, &a.files(), CheckTime::Now)?;
    assert_eq!(before.leaf.uris, ["spiffe://cluster.local/ns/shop/sa/web"]);
    assert_eq!(before.leaf.dns_names, ["web-a.shop.svc"]);
    verify_chain(&before.chain, &cluster.root_pem, SystemTime::now())?;
    let old_root = serial(&cluster.root_pem);
    assert_eq!(serials(&before.ca)?, std::slice::from_ref(&old_root));
    assert!(
        credlet_ca::key_matches_certificate(&before.key, &before.chain)?,
        "key and leaf differ"
    );

    // A publish with another pod's token: refused, nothing left behind.
    let (mut stolen, _) = cluster.app(&agent, "b")?;
    stolen.tokens = Some(tokens_json(&a_token));
    expect_code(
        csi.publish(&stolen).await,
        Code::PermissionDenied,
        "belongs to pod shop/web-a",
    );
    assert_nothing_on_disk(&agent, &stolen);
    wait_for_log(
        "the CA's denial",
        &ca.env,
        0,
        &["request denied", "TokenForAnotherPod"],
    )
    .await;

    // CA rollover: new root and key files. Every published volume's ca.crt
    // gains the new root next to the old one; key and certificate stay.
    let (new_root_pem, new_key_pem) = new_root()?;
    let new_root = serial(&new_root_pem);
    cluster.replace_ca(&new_root_pem, &new_key_pem)?;
    let rolled = wait_until("old and new roots in ca.crt", WAIT, || {
        let snapshot = read_volume(&a.target, &a.files())?;
        let roots: BTreeSet<String> = serials(&snapshot.ca)?.into_iter().collect();
        let expected = BTreeSet::from([old_root.clone(), new_root.clone()]);
        ensure!(roots == expected, "roots {roots:?}");
        Ok(snapshot)
    })
    .await;
    assert_eq!(serials(&rolled.ca)?.len(), 2, "duplicate roots");
    assert_eq!(rolled.key, before.key, "the key changed with the bundle");
    assert_eq!(rolled.chain, before.chain, "re-issued instead of swapped");
    assert_ne!(rolled.data_dir, before.data_dir, "no new payload written");
    check_volume(&a.target, &a.files(), CheckTime::Now)?;

    // New certificates come from the new root over the same connection.
    let (c, _) = cluster.app(&agent, "c")?;
    csi.publish(&c).await.expect("publish after the rollover");
    let c_files = check_volume(&c.target, &c.files(), CheckTime::Now)?;
    verify_chain(&c_files.chain, &new_root_pem, SystemTime::now())?;
    assert!(verify_chain(&c_files.chain, &cluster.root_pem, SystemTime::now()).is_err());
    let c_roots: BTreeSet<String> = serials(&c_files.ca)?.into_iter().collect();
    assert_eq!(
        c_roots,
        BTreeSet::from([old_root.clone(), new_root.clone()])
    );

    // The agent restarts with only the old root in --ca-trust: it still
    // reaches the CA (whose serving certificate now comes from the new
    // root) through the bundle it kept, and gets its certificate again.
    drop(csi);
    stop_cleanly(&mut agent, "credlet agent before the restart").await;
    let offset = std::fs::metadata(&agent.log_path).map_or(0, |m| m.len());
    let mut command = agent_command(&agent, &cluster, &ca);
    command.arg("--health-listen").arg(health.to_string());
    agent.spawn_command(command);
    let csi = agent.wait_ready().await;
    wait_for_log(
        "the restarted agent's certificate",
        &agent,
        offset,
        &["agent client certificate from the CA"],
    )
    .await;
    let (c2, _) = cluster.app(&agent, "c2")?;
    csi.publish(&c2).await.expect("publish after restarting");
    verify_chain(
        &check_volume(&c2.target, &c2.files(), CheckTime::Now)?.chain,
        &new_root_pem,
        SystemTime::now(),
    )?;

    // A garbage key file: the CA says so and keeps serving with the key it
    // has.
    let offset = ca.log_len();
    write_atomically(
        &cluster.ca_key,
        b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n",
    )?;
    wait_for_log(
        "the CA reporting the bad key file",
        &ca.env,
        offset,
        &["does not load", "ca.key"],
    )
    .await;
    assert!(ca.env.agent_running(), "the CA exited over a bad key file");
    let (d, _) = cluster.app(&agent, "d")?;
    csi.publish(&d)
        .await
        .expect("publish with a bad key file on the CA");
    let d_files = check_volume(&d.target, &d.files(), CheckTime::Now)?;
    verify_chain(&d_files.chain, &new_root_pem, SystemTime::now())?;

    // The CA process dies: published volumes keep their files; a new
    // publish fails fast with Unavailable and leaves nothing.
    ca.env.kill();
    let after_kill = check_volume(&a.target, &a.files(), CheckTime::Now)?;
    assert_eq!(after_kill.leaf.serial_hex, before.leaf.serial_hex);
    assert_eq!(after_kill.key, before.key);
    let (e, _) = cluster.app(&agent, "e")?;
    let started = Instant::now();
    let status = expect_code(csi.publish(&e).await, Code::Unavailable, "");
    let took = started.elapsed();
    eprintln!("publish with the CA gone: {took:?}: {}", status.message());
    assert!(
        took <= CA_TIMEOUT + Duration::from_millis(500),
        "the failed publish took {took:?} (--ca-timeout-ms {CA_TIMEOUT:?})"
    );
    assert_nothing_on_disk(&agent, &e);
    // The outage shows: not ready (CA unreachable), failed calls counted,
    // and the certificates still valid.
    wait_until("/readyz reporting the CA down", WAIT, || {
        let (code, why) = http_get(health, "/readyz")?;
        ensure!(code == 503 && why.contains("ca: "), "{code}: {why}");
        Ok(())
    })
    .await;
    let (_, metrics) = http_get(health, "/metrics")?;
    let failed: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with(r#"credlet_ca_client_requests_total{rpc="IssuePodCertificate""#)
                && !l.contains(r#"outcome="ok""#)
                && !l.contains(r#"outcome="permission_denied""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(failed >= 1.0, "the failed publish is counted:\n{metrics}");
    let expiry =
        metric_value(&metrics, "credlet_csi_certificate_expiry_seconds").expect("expiry gauge");
    assert!(expiry > 0.0, "certificates still valid: {expiry}");

    // SIGTERM: the agent exits 0 and leaves the volumes mounted.
    drop(csi);
    stop_cleanly(&mut agent, "credlet agent").await;
    assert!(mount_at(&a.target).is_some(), "SIGTERM unmounted a volume");
    check_volume(&a.target, &a.files(), CheckTime::Now)?;
    drop(cluster);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_ca_and_the_agent_with_exit_zero() -> Result<()> {
    let cluster = Cluster::start()?;
    let mut ca = CaProcess::new(agent_bin!(), &cluster)?;
    ca.start().await.expect("credlet ca listening");
    cluster.write_agent_token(&cluster.agent_pod()?)?;
    let mut agent = TestEnv::new(agent_bin!());
    let command = agent_command(&agent, &cluster, &ca);
    agent.spawn_command(command);
    let csi = agent.wait_ready().await;
    let (volume, _) = cluster.app(&agent, "a")?;
    csi.publish(&volume).await.expect("publish");
    let published = check_volume(&volume.target, &volume.files(), CheckTime::Now)?;
    // The agent's trust bundle stream is open.
    wait_for_log(
        "the agent's trust bundle stream",
        &agent,
        0,
        &["trust bundle from the CA"],
    )
    .await;

    // The CA drains with the stream open and exits 0 well before its drain
    // timeout; then the agent.
    stop_cleanly(&mut ca.env, "credlet ca").await;
    let log = ca.env.log();
    assert!(log.contains("credlet ca stopped"), "no clean stop logged");
    assert!(!log.contains("drain timed out"), "the drain timed out");
    drop(csi);
    stop_cleanly(&mut agent, "credlet agent").await;
    let kept = check_volume(&volume.target, &volume.files(), CheckTime::Now)?;
    assert_eq!(kept.leaf.serial_hex, published.leaf.serial_hex);
    assert!(
        mount_at(&volume.target).is_some(),
        "SIGTERM unmounted a volume"
    );
    Ok(())
}

/// Publishes that arrive together reach the real CA partly as
/// `IssuePodCertificates` batches; every volume gets its own valid
/// certificate, and both sides count the batched calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_reach_the_ca_in_batches() -> Result<()> {
    let cluster = Cluster::start()?;
    let mut ca = CaProcess::new(agent_bin!(), &cluster)?;
    let ca_metrics: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
    ca.args.push("--metrics-listen".into());
    ca.args.push(ca_metrics.to_string().into());
    ca.start().await.expect("credlet ca listening");
    cluster.write_agent_token(&cluster.agent_pod()?)?;
    let mut agent = TestEnv::new(agent_bin!());
    let health: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut command = agent_command(&agent, &cluster, &ca);
    command.arg("--health-listen").arg(health.to_string());
    agent.spawn_command(command);
    let csi = agent.wait_ready().await;

    let mut volumes = Vec::new();
    for i in 0..32 {
        volumes.push(cluster.app(&agent, &format!("burst-{i}"))?.0);
    }
    let mut publishes = tokio::task::JoinSet::new();
    for volume in volumes.clone() {
        let csi = csi.clone();
        publishes.spawn(async move { csi.publish(&volume).await });
    }
    while let Some(result) = publishes.join_next().await {
        result?.expect("publish");
    }
    for volume in &volumes {
        let files = check_volume(&volume.target, &volume.files(), CheckTime::Now)?;
        assert!(credlet_ca::key_matches_certificate(
            &files.key,
            &files.chain
        )?);
        verify_chain(&files.chain, &cluster.root_pem, SystemTime::now())?;
    }

    let counted = |text: &str, series: &str| metric_value(text, series).unwrap_or(0.0);
    let (_, agent_side) = http_get(health, "/metrics")?;
    let batches = counted(
        &agent_side,
        r#"credlet_ca_client_requests_total{rpc="IssuePodCertificates",outcome="ok"}"#,
    );
    let singles = counted(
        &agent_side,
        r#"credlet_ca_client_requests_total{rpc="IssuePodCertificate",outcome="ok"}"#,
    );
    assert!(batches >= 1.0, "no batch call:\n{agent_side}");
    assert!(
        singles + batches < 32.0,
        "no fewer calls than publishes:\n{agent_side}"
    );
    let (_, ca_side) = http_get(ca_metrics, "/metrics")?;
    let batched = counted(
        &ca_side,
        r#"credlet_ca_requests_total{rpc="IssuePodCertificates",outcome="Issued"}"#,
    );
    let single = counted(
        &ca_side,
        r#"credlet_ca_requests_total{rpc="IssuePodCertificate",outcome="Issued"}"#,
    );
    assert_eq!(batched + single, 32.0, "{ca_side}");
    assert!(batched >= 2.0, "{ca_side}");
    drop(csi);
    stop_cleanly(&mut agent, "credlet agent").await;
    stop_cleanly(&mut ca.env, "credlet ca").await;
    Ok(())
}

/// A volume's templates go to `credlet ca` as written and come back
/// expanded from the verified token: `${NAME}` DNS names and a
/// `credlet.io/spiffe-id` with `$TRUST_DOMAIN` below the pod's path. A
/// SPIFFE ID outside that path is refused with `PermissionDenied` and
/// leaves nothing on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_expands_the_volume_templates_and_spiffe_id() -> Result<()> {
    let cluster = Cluster::start()?;
    let mut ca = CaProcess::new(agent_bin!(), &cluster)?;
    ca.start().await.expect("credlet ca listening");
    cluster.write_agent_token(&cluster.agent_pod()?)?;
    let mut agent = TestEnv::new(agent_bin!());
    let command = agent_command(&agent, &cluster, &ca);
    agent.spawn_command(command);
    let csi = agent.wait_ready().await;

    let (volume, _) = cluster.app(&agent, "tpl")?;
    let volume = volume
        .with("credlet.io/dns-names", "${POD_NAME}.${POD_NAMESPACE}.svc")
        .with(
            "credlet.io/spiffe-id",
            "spiffe://$TRUST_DOMAIN/ns/$POD_NAMESPACE/sa/${SERVICE_ACCOUNT_NAME}/$POD_NAME",
        );
    csi.publish(&volume).await.expect("publish");
    let files = check_volume(&volume.target, &volume.files(), CheckTime::Now)?;
    assert_eq!(files.leaf.dns_names, ["web-tpl.shop.svc"]);
    assert_eq!(
        files.leaf.uris,
        ["spiffe://cluster.local/ns/shop/sa/web/web-tpl"]
    );
    verify_chain(&files.chain, &cluster.root_pem, SystemTime::now())?;

    let (outside, _) = cluster.app(&agent, "outside")?;
    let outside = outside.with(
        "credlet.io/spiffe-id",
        "spiffe://$TRUST_DOMAIN/ns/kube-system/sa/$SERVICE_ACCOUNT_NAME",
    );
    expect_code(
        csi.publish(&outside).await,
        Code::PermissionDenied,
        "spiffe://cluster.local/ns/kube-system/sa/web",
    );
    assert_nothing_on_disk(&agent, &outside);
    wait_for_log(
        "the CA's denial",
        &ca.env,
        0,
        &["request denied", "SanNotAllowed"],
    )
    .await;
    drop(csi);
    stop_cleanly(&mut agent, "credlet agent").await;
    stop_cleanly(&mut ca.env, "credlet ca").await;
    Ok(())
}

/// `credlet ca --token-verification jwks`: tokens are checked against the
/// service account issuer keys the API server publishes, with no
/// TokenReview; a token signed by any other key is refused and leaves
/// nothing on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_verifying_tokens_offline_issues_without_token_reviews() -> Result<()> {
    let cluster = Cluster::start()?;
    let mut ca = CaProcess::new(agent_bin!(), &cluster)?;
    ca.args.push("--token-verification".into());
    ca.args.push("jwks".into());
    ca.start().await.expect("credlet ca listening");
    cluster.write_agent_token(&cluster.agent_pod()?)?;
    let mut agent = TestEnv::new(agent_bin!());
    let command = agent_command(&agent, &cluster, &ca);
    agent.spawn_command(command);
    let csi = agent.wait_ready().await;

    for name in ["a", "b"] {
        let (volume, _) = cluster.app(&agent, name)?;
        csi.publish(&volume).await.expect("publish");
        let files = check_volume(&volume.target, &volume.files(), CheckTime::Now)?;
        assert_eq!(files.leaf.dns_names, [format!("web-{name}.shop.svc")]);
        verify_chain(&files.chain, &cluster.root_pem, SystemTime::now())?;
    }
    let (reviews, _) = cluster.api_calls();
    assert_eq!(reviews, 0, "TokenReviews in jwks mode");
    let log = ca.env.log();
    assert!(
        log.contains("service account issuer keys loaded"),
        "no key load logged"
    );

    // A token with the cluster's claims, signed by another issuer's key
    // under the same key id.
    let impostor =
        credlet_test_util::sa_token::ServiceAccountIssuer::es256(credlet_tests::cluster::ISSUER)?;
    let (mut forged, _) = cluster.app(&agent, "c")?;
    let forged_token = impostor.mint(&credlet_test_util::sa_token::BoundClaims {
        issuer: credlet_tests::cluster::ISSUER.into(),
        audiences: vec![credlet_tests::cluster::AUDIENCE.into()],
        namespace: forged.pod.namespace.clone(),
        service_account: forged.pod.service_account.clone(),
        pod: forged.pod.name.clone(),
        pod_uid: forged.pod.uid.clone(),
        node: NODE.into(),
        lifetime_s: 3600,
    })?;
    forged.tokens = Some(tokens_json(&forged_token));
    // The agent answers the kubelet PermissionDenied with the CA's reason.
    let status = expect_code(
        csi.publish(&forged).await,
        Code::PermissionDenied,
        "signature does not verify",
    );
    assert!(
        !status
            .message()
            .contains(&forged_token[forged_token.len() - 24..])
    );
    assert_nothing_on_disk(&agent, &forged);
    assert!(
        !ca.env
            .log()
            .contains(&forged_token[forged_token.len() - 24..]),
        "the forged token was logged"
    );
    drop(csi);
    stop_cleanly(&mut agent, "credlet agent").await;
    stop_cleanly(&mut ca.env, "credlet ca").await;
    Ok(())
}
