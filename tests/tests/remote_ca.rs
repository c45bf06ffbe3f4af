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
//! SIGTERM to both processes, and the CA's identity: a server holding a pod
//! certificate (or a certificate from a root planted in the agent's saved
//! bundle) never gets the agent's token, pods never get the CA's own names,
//! and a trust domain mismatch is named.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Result, bail, ensure};
use credlet_ca::{inspect_leaf, verify_chain};
use credlet_tests::cluster::{
    CA_TIMEOUT, CaProcess, Cluster, NODE, agent_command, agent_command_for_url, new_root,
    tokens_json, write_atomically,
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
    // The missing token file is counted.
    let (_, metrics) = http_get(health, "/metrics")?;
    let misses = metric_value(&metrics, "credlet_ca_client_token_read_errors_total");
    assert!(misses.is_some_and(|n| n >= 1.0), "{misses:?}:\n{metrics}");
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
            r#"credlet_ca_client_requests_total{rpc="IssueAgentCertificate",outcome="Ok"}"#,
            1.0,
        ),
        (
            r#"credlet_ca_client_requests_total{rpc="IssuePodCertificate",outcome="Ok"}"#,
            1.0,
        ),
        (
            r#"credlet_ca_client_requests_total{rpc="WatchTrustBundle",outcome="Ok"}"#,
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
        "the failed publish took {took:?} (--ca-timeout {CA_TIMEOUT:?})"
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
                && !l.contains(r#"outcome="Ok""#)
                && !l.contains(r#"outcome="PermissionDenied""#)
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
    ca.set_arg("--metrics-listen", Some(&ca_metrics.to_string()));
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
        r#"credlet_ca_client_requests_total{rpc="IssuePodCertificates",outcome="Ok"}"#,
    );
    let singles = counted(
        &agent_side,
        r#"credlet_ca_client_requests_total{rpc="IssuePodCertificate",outcome="Ok"}"#,
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

    // A CSIDriver without tokenRequests: the kubelet sends no token.
    let (mut tokenless, _) = cluster.app(&agent, "tokenless")?;
    tokenless.tokens = None;
    expect_code(
        csi.publish(&tokenless).await,
        Code::InvalidArgument,
        r#"no service account token for audience "credlet-ca": the CSIDriver needs tokenRequests with that audience"#,
    );
    assert_nothing_on_disk(&agent, &tokenless);

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

// --- the CA's identity -------------------------------------------------------------

/// A TLS server that is not the CA: serves a certificate chain and key on
/// one address and keeps every byte a client sends after the handshake.
struct Impostor {
    addr: std::net::SocketAddr,
    seen: std::sync::Arc<std::sync::Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Default)]
struct Seen {
    handshakes: usize,
    failed_handshakes: usize,
    bytes: Vec<u8>,
}

impl Impostor {
    /// Listens on `ip` (a free port) with `chain_pem` and `key_pem`.
    async fn start(ip: std::net::IpAddr, chain_pem: &str, key_pem: &str) -> Result<Self> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let chain =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
        let mut config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind((ip, 0)).await?;
        let addr = listener.local_addr()?;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
        let record = std::sync::Arc::clone(&seen);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let record = std::sync::Arc::clone(&record);
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        record.lock().unwrap().failed_handshakes += 1;
                        return;
                    };
                    record.lock().unwrap().handshakes += 1;
                    // An empty HTTP/2 SETTINGS frame, so the client sends
                    // its request; then everything it sends is kept.
                    let _ = tls.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await
                    {
                        if n == 0 {
                            break;
                        }
                        record.lock().unwrap().bytes.extend_from_slice(&buf[..n]);
                    }
                });
            }
        });
        Ok(Self { addr, seen, task })
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Whether a client sent `needle` after a completed handshake.
    fn received(&self, needle: &str) -> bool {
        let seen = self.seen.lock().unwrap();
        seen.bytes
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    }

    fn handshakes(&self) -> (usize, usize) {
        let seen = self.seen.lock().unwrap();
        (seen.handshakes, seen.failed_handshakes)
    }
}

impl Drop for Impostor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until the agent logs a line with every needle or the impostor
/// receives the token, whichever comes first; fails on the token.
async fn refused_without_the_token(
    agent: &mut TestEnv,
    impostor: &Impostor,
    token: &str,
    needles: &[&str],
) {
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(
            !impostor.received(token),
            "the agent sent its service account token to a server that is not the CA \
             (handshakes completed/failed: {:?})",
            impostor.handshakes()
        );
        if agent
            .log()
            .lines()
            .any(|line| needles.iter().all(|n| line.contains(n)))
        {
            break;
        }
        assert!(agent.agent_running(), "the agent exited");
        assert!(
            Instant::now() < deadline,
            "no log line with {needles:?} after {WAIT:?}; impostor handshakes \
             completed/failed: {:?}",
            impostor.handshakes()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A few more attempts (the agent retries with backoff): still nothing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!impostor.received(token), "the token reached the impostor");
    let (completed, failed) = impostor.handshakes();
    assert_eq!(completed, 0, "a TLS handshake with the impostor completed");
    assert!(failed >= 1, "the agent never tried the impostor");
}

/// The CA allows IP SANs from 127.0.0.0/8 and the DNS SAN `localhost`, and
/// serves as `127.0.0.1` and `localhost`: a pod gets neither of the CA's
/// own names, while other names of the same ranges are still issued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_never_get_the_cas_own_server_names() -> Result<()> {
    let cluster = Cluster::start()?;
    let mut ca = CaProcess::new(agent_bin!(), &cluster)?;
    for arg in [
        "--allowed-ip-cidr",
        "127.0.0.0/8",
        "--dns-template",
        "localhost",
    ] {
        ca.args.push(arg.into());
    }
    ca.start().await.expect("credlet ca listening");
    cluster.write_agent_token(&cluster.agent_pod()?)?;
    let mut agent = TestEnv::new(agent_bin!());
    agent.spawn_command(agent_command(&agent, &cluster, &ca));
    let csi = agent.wait_ready().await;

    let (other, _) = cluster.app(&agent, "other-ip")?;
    let other = other.with("credlet.io/ip-addresses", "127.0.0.2");
    csi.publish(&other)
        .await
        .expect("an IP SAN that is not the CA's");
    let files = check_volume(&other.target, &other.files(), CheckTime::Now)?;
    assert_eq!(
        files.leaf.ip_addresses,
        ["127.0.0.2".parse::<std::net::IpAddr>()?]
    );

    for (name, key, value) in [
        ("ca-ip", "credlet.io/ip-addresses", "127.0.0.1"),
        ("ca-ip6", "credlet.io/ip-addresses", "::ffff:127.0.0.1"),
        ("ca-dns", "credlet.io/dns-names", "localhost"),
    ] {
        let (volume, _) = cluster.app(&agent, name)?;
        let volume = volume.with(key, value);
        let status = expect_code(csi.publish(&volume).await, Code::PermissionDenied, value);
        assert!(
            status.message().contains("CA's own"),
            "{name}: {:?}",
            status.message()
        );
        assert_nothing_on_disk(&agent, &volume);
    }
    wait_for_log(
        "the CA's denial",
        &ca.env,
        0,
        &["request denied", "SanReservedForCa"],
    )
    .await;
    drop(csi);
    stop_cleanly(&mut agent, "credlet agent").await;
    stop_cleanly(&mut ca.env, "credlet ca").await;
    Ok(())
}

/// A pod whose certificate carries an address the agent reaches the CA by
/// (here `127.0.0.2`, a name the CA does not know as its own, so it issues
/// it) serves that certificate and key as the CA. The agent's chain and
/// host name checks pass; it must still refuse the handshake, because the
/// certificate lacks the CA's identity, and never send its token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_certificate_posing_as_the_ca_never_gets_the_agents_token() -> Result<()> {
    let cluster = Cluster::start()?;
    let mut ca = CaProcess::new(agent_bin!(), &cluster)?;
    ca.args.push("--allowed-ip-cidr".into());
    ca.args.push("127.0.0.0/8".into());
    ca.start().await.expect("credlet ca listening");
    let token = cluster.agent_pod()?;
    cluster.write_agent_token(&token)?;
    let mut agent = TestEnv::new(agent_bin!());
    agent.spawn_command(agent_command(&agent, &cluster, &ca));
    let csi = agent.wait_ready().await;

    // The pod's certificate: chained to the CA's root, IP SAN 127.0.0.2.
    let (mask, _) = cluster.app(&agent, "mask")?;
    let mask = mask.with("credlet.io/ip-addresses", "127.0.0.2");
    csi.publish(&mask).await.expect("publish the pod's volume");
    let files = check_volume(&mask.target, &mask.files(), CheckTime::Now)?;
    verify_chain(&files.chain, &cluster.root_pem, SystemTime::now())?;
    let impostor = Impostor::start([127, 0, 0, 2].into(), &files.chain, &files.key).await?;

    // Another node's agent is pointed at the pod (DNS or routing is the
    // attacker's): same trust bundle, same kind of token.
    let mut victim = TestEnv::new(agent_bin!());
    victim.spawn_command(agent_command_for_url(&victim, &cluster, &impostor.url()));
    refused_without_the_token(
        &mut victim,
        &impostor,
        &token,
        &["is not the CA", "spiffe://cluster.local/credlet/ca"],
    )
    .await;
    let (_, ready) = connect(&mut victim).await;
    assert_eq!(ready, Some(false), "ready without the CA");
    drop(csi);
    stop_cleanly(&mut victim, "the victim agent").await;
    stop_cleanly(&mut agent, "credlet agent").await;
    stop_cleanly(&mut ca.env, "credlet ca").await;
    Ok(())
}

/// The agent keeps the roots the CA published in its state directory. A
/// root added to that file behind its back (here: appended to it) is not
/// trusted at the next start, so a server with a certificate from that root
/// — even one naming the CA's identity — gets no token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_planted_in_the_agents_saved_bundle_is_not_trusted() -> Result<()> {
    let cluster = Cluster::start()?;
    let mut ca = CaProcess::new(agent_bin!(), &cluster)?;
    ca.start().await.expect("credlet ca listening");
    let token = cluster.agent_pod()?;
    cluster.write_agent_token(&token)?;
    let mut agent = TestEnv::new(agent_bin!());
    agent.spawn_command(agent_command(&agent, &cluster, &ca));
    let csi = agent.wait_ready().await;
    wait_for_log(
        "the agent's trust bundle stream",
        &agent,
        0,
        &["trust bundle from the CA"],
    )
    .await;
    let saved = agent.state_dir.join("ca-trust-bundle.pem");
    wait_until("the saved trust bundle", WAIT, || {
        ensure!(
            std::fs::read_to_string(&saved)?.contains(cluster.root_pem.trim()),
            "not written yet"
        );
        Ok(())
    })
    .await;
    drop(csi);
    stop_cleanly(&mut agent, "credlet agent").await;

    // The attacker's root, and a serving certificate from it that names
    // the CA's identity and the address the agent will dial.
    let (attacker, attacker_root, _) = credlet_ca::Authority::generate_self_signed_with_pems(
        credlet_ca::Policy::new("cluster.local"),
    )?;
    let key = credlet_ca::PrivateKey::generate(credlet_ca::KeyType::EcdsaP256)?;
    let served = attacker.issue_component(
        &key.certificate_signing_request()?,
        "spiffe://cluster.local/credlet/ca",
        &[],
        &["127.0.0.3".parse()?],
        Duration::from_secs(3600),
        SystemTime::now(),
    )?;
    let mut planted = std::fs::read_to_string(&saved)?;
    planted.push_str(&attacker_root);
    std::fs::write(&saved, planted)?;
    let impostor = Impostor::start([127, 0, 0, 3].into(), &served.chain_pem, key.pem()).await?;

    let offset = std::fs::metadata(&agent.log_path).map_or(0, |m| m.len());
    agent.spawn_command(agent_command_for_url(&agent, &cluster, &impostor.url()));
    refused_without_the_token(
        &mut agent,
        &impostor,
        &token,
        &["saved trust bundle", "ignored"],
    )
    .await;
    let (log, _) = agent.log_from(offset);
    assert!(
        !log.lines()
            .any(|l| l.contains("agent client certificate from the CA")
                && !l.contains("could not get")),
        "the agent got a certificate from the impostor:\n{log}"
    );
    stop_cleanly(&mut agent, "credlet agent").await;
    stop_cleanly(&mut ca.env, "credlet ca").await;
    Ok(())
}

/// An agent configured for another trust domain than the CA's says so
/// instead of failing obscurely.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trust_domain_mismatch_is_named() -> Result<()> {
    let cluster = Cluster::start()?;
    let mut ca = CaProcess::new(agent_bin!(), &cluster)?;
    ca.start().await.expect("credlet ca listening");
    cluster.write_agent_token(&cluster.agent_pod()?)?;
    let mut agent = TestEnv::new(agent_bin!());
    let mut command = agent_command(&agent, &cluster, &ca);
    command.arg("--trust-domain").arg("example.org");
    agent.spawn_command(command);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = agent.log();
        if log.lines().any(|line| {
            [
                "trust domain",
                "\"cluster.local\"",
                "--trust-domain \"example.org\"",
            ]
            .iter()
            .all(|n| line.contains(n))
        }) {
            break;
        }
        assert!(
            !log.lines()
                .any(|l| l.contains("agent client certificate from the CA")
                    && !l.contains("could not get")),
            "the agent of trust domain example.org accepted the CA of cluster.local"
        );
        assert!(agent.agent_running(), "the agent exited");
        assert!(Instant::now() < deadline, "no trust domain mismatch logged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, ready) = connect(&mut agent).await;
    assert_eq!(ready, Some(false));
    stop_cleanly(&mut agent, "credlet agent").await;
    stop_cleanly(&mut ca.env, "credlet ca").await;
    Ok(())
}

/// `credlet ca` without `--metrics-listen` serves its unauthenticated
/// metrics and probes on loopback only, as the agent does; the deployment
/// asks for `0.0.0.0:9090` explicitly for the kubelet's probes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_serves_metrics_on_loopback_unless_told_otherwise() -> Result<()> {
    let cluster = Cluster::start()?;
    let mut ca = CaProcess::new(agent_bin!(), &cluster)?;
    ca.set_arg("--metrics-listen", None);
    if ca.start().await.is_err() {
        // Something else on this host has the port: the CA refuses to
        // start, naming the default address.
        let log = ca.env.log();
        assert!(
            log.contains(
                "credlet: --metrics-listen (CREDLET_METRICS_LISTEN): 127.0.0.1:9090 is in use by another process"
            ),
            "{log}"
        );
        return Ok(());
    }
    let line = wait_until("the CA's metrics address", WAIT, || {
        let log = ca.env.log();
        let line = log
            .lines()
            .find(|l| l.contains("metrics") && l.contains("addr="))
            .map(str::to_owned);
        line.ok_or_else(|| anyhow::anyhow!("not logged yet"))
    })
    .await;
    assert!(
        line.contains("addr=127.0.0.1:9090"),
        "metrics not on loopback by default: {line}"
    );
    stop_cleanly(&mut ca.env, "credlet ca").await;
    Ok(())
}

/// `credlet ca`'s `/readyz` means it: ready only while the API server
/// answers (TokenReviews, pod checks and the issuer's keys come from it);
/// a PodCertificateRequest signer that can not start (API discovery fails)
/// is retried and reported as degraded while the CA stays ready for the
/// agents, and starts once the API lets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_readiness_follows_the_api_server_and_a_failing_signer_only_degrades() -> Result<()> {
    let cluster = Cluster::start()?;
    // API discovery fails (past the client's own retries) until cleared.
    cluster
        .api
        .fail_requests("GET", "/apis/certificates.k8s.io/v1", usize::MAX, 503);
    let mut ca = CaProcess::new(agent_bin!(), &cluster)?;
    let probes: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
    ca.set_arg("--metrics-listen", Some(&probes.to_string()));
    ca.set_arg("--signer-name", Some("credlet.io/pods"));
    ca.start().await?;
    let readyz = || http_get(probes, "/readyz").map_err(anyhow::Error::from);

    // A failing signer leaves the CA ready, saying what is wrong with it.
    wait_until("ready with the signer reported degraded", WAIT, || {
        let (code, body) = readyz()?;
        ensure!(
            code == 200
                && body.starts_with("ok\n")
                && body.contains(
                    "signer: degraded: not started, retrying: discovering certificates.k8s.io"
                ),
            "{code} {body}"
        );
        Ok(())
    })
    .await;
    cluster.api.clear_faults();
    wait_until("the signer started on a retry", WAIT, || {
        let (code, body) = readyz()?;
        ensure!((code, body.as_str()) == (200, "ok\n"), "{code} {body}");
        Ok(())
    })
    .await;
    assert!(
        ca.env
            .log()
            .contains("the PodCertificateRequest signer started")
    );

    // The API server stops answering: not ready, saying why; back: ready.
    cluster
        .api
        .fail_requests("GET", "/version", usize::MAX, 503);
    let (_, body) = wait_until("not ready without the API server", WAIT, || {
        let (code, body) = readyz()?;
        ensure!(code == 503, "{code} {body}");
        Ok((code, body))
    })
    .await;
    assert!(body.contains("api-server: the API server"), "{body}");
    cluster.api.clear_faults();
    wait_until("ready again with the API server", WAIT, || {
        let (code, body) = readyz()?;
        ensure!(code == 200, "{code} {body}");
        Ok(())
    })
    .await;
    stop_cleanly(&mut ca.env, "credlet ca").await;
    Ok(())
}
