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
//! key file, the CA process gone, and SIGTERM to both processes.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use credlet_ca::{Authority, Policy, inspect_leaf, verify_chain};
use credlet_test_util::{FakeApiServer, free_port};
use credlet_tests::agent_bin;
use credlet_tests::harness::{
    CheckTime, Csi, NAMESPACE, Pod, SERVICE_ACCOUNT, TestEnv, Volume, check_volume, mount_at,
    read_volume, wait_until,
};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewStatus, UserInfo};
use tonic::Code;

/// The audience of every token here (`--token-audience` of both processes).
const AUDIENCE: &str = "credlet-ca";
/// The node the agent runs on and every pod is scheduled to.
const NODE: &str = "node-a";
/// The agent's pod and service account (the CA's default
/// `--agent-service-account credlet/credlet-agent`).
const AGENT_NAMESPACE: &str = "credlet";
const AGENT_SERVICE_ACCOUNT: &str = "credlet-agent";
const AGENT_POD: &str = "credlet-agent-node-a";
/// The agent's `--ca-timeout-ms`.
const CA_TIMEOUT: Duration = Duration::from_millis(2000);
/// How long anything asynchronous may take (start-up, reloads, bundle
/// propagation).
const WAIT: Duration = Duration::from_secs(60);
/// How long a SIGTERMed process may take to exit.
const EXIT_WITHIN: Duration = Duration::from_secs(15);
/// The DNS SAN template the volumes ask for and the CA allows.
const DNS_TEMPLATE: &str = "$POD_NAME.$POD_NAMESPACE.svc";

/// What the API server knows about one token.
#[derive(Clone, Debug)]
struct BoundToken {
    namespace: String,
    service_account: String,
    pod: String,
    uid: String,
    node: String,
}

type Tokens = Arc<Mutex<HashMap<String, BoundToken>>>;

/// The fake API server (TokenReview + pods) and the files both processes
/// read: kubeconfig, CA certificate and key, the agent's trust bundle and
/// its projected token.
struct Cluster {
    api: FakeApiServer,
    tokens: Tokens,
    next_token: AtomicU64,
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    ca_cert: PathBuf,
    ca_key: PathBuf,
    /// The agent's `--ca-trust`: the first root, never rewritten.
    ca_trust: PathBuf,
    agent_token_file: PathBuf,
    /// The first CA root, PEM.
    root_pem: String,
}

impl Cluster {
    fn start() -> Result<Self> {
        let api = FakeApiServer::start()?;
        let tokens: Tokens = Arc::default();
        let reviewer = Arc::clone(&tokens);
        api.set_token_reviewer(move |review: &TokenReview| review_token(&reviewer, review));
        let dir = tempfile::Builder::new()
            .prefix("credlet-remote-ca-")
            .tempdir()?;
        let base = dir.path().canonicalize()?;
        let kubeconfig = base.join("kubeconfig");
        fs::write(&kubeconfig, kubeconfig_yaml(&api.url()))?;
        let ca_dir = base.join("ca");
        fs::create_dir(&ca_dir)?;
        let (root_pem, key_pem) = new_root()?;
        let cluster = Self {
            api,
            tokens,
            next_token: AtomicU64::new(0),
            kubeconfig,
            ca_cert: ca_dir.join("ca.crt"),
            ca_key: ca_dir.join("ca.key"),
            ca_trust: base.join("ca-trust.pem"),
            agent_token_file: base.join("agent-token"),
            root_pem,
            _dir: dir,
        };
        write_atomically(&cluster.ca_key, key_pem.as_bytes())?;
        write_atomically(&cluster.ca_cert, cluster.root_pem.as_bytes())?;
        fs::write(&cluster.ca_trust, &cluster.root_pem)?;
        Ok(cluster)
    }

    /// Creates a pod on [`NODE`]; returns its uid (set by the API server).
    fn pod(&self, namespace: &str, name: &str, service_account: &str) -> Result<String> {
        let pod = self.api.create_pod(&serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "nodeName": NODE,
                "serviceAccountName": service_account,
                "containers": [{"name": "app", "image": "registry.example/app:1"}],
            },
        }))?;
        pod.metadata.uid.context("pod without uid")
    }

    /// A projected token for [`AUDIENCE`] bound to the pod, known to the
    /// TokenReview from now on.
    fn token(&self, bound: BoundToken) -> String {
        let n = self.next_token.fetch_add(1, Ordering::Relaxed);
        let token = format!("test-token-{}-{n}-{}", bound.pod, fastrand::u64(..));
        self.tokens.lock().unwrap().insert(token.clone(), bound);
        token
    }

    /// The agent's pod and its token (not yet in the token file).
    fn agent_pod(&self) -> Result<String> {
        let uid = self.pod(AGENT_NAMESPACE, AGENT_POD, AGENT_SERVICE_ACCOUNT)?;
        Ok(self.token(BoundToken {
            namespace: AGENT_NAMESPACE.into(),
            service_account: AGENT_SERVICE_ACCOUNT.into(),
            pod: AGENT_POD.into(),
            uid,
            node: NODE.into(),
        }))
    }

    /// What the kubelet does for the agent's projected token volume.
    fn write_agent_token(&self, token: &str) -> Result<()> {
        write_atomically(&self.agent_token_file, token.as_bytes())
    }

    /// An application pod `web-<name>` on [`NODE`] in the API server, its
    /// token, and its inline volume as the kubelet would publish it (target
    /// parent created, the token map in the volume context).
    fn app(&self, env: &TestEnv, name: &str) -> Result<(Volume, String)> {
        let pod_name = format!("web-{name}");
        let uid = self.pod(NAMESPACE, &pod_name, SERVICE_ACCOUNT)?;
        let token = self.token(BoundToken {
            namespace: NAMESPACE.into(),
            service_account: SERVICE_ACCOUNT.into(),
            pod: pod_name.clone(),
            uid: uid.clone(),
            node: NODE.into(),
        });
        let target = env.target_path(&uid, "certs");
        fs::create_dir_all(target.parent().context("target parent")?)?;
        let volume = Volume {
            id: format!("csi-{name}"),
            target,
            pod: Pod {
                name: pod_name,
                namespace: NAMESPACE.into(),
                uid,
                service_account: SERVICE_ACCOUNT.into(),
            },
            attributes: Default::default(),
            volume_mount_group: String::new(),
            tokens: Some(tokens_json(&token)),
        }
        .with("credlet.io/dns-names", DNS_TEMPLATE);
        Ok((volume, token))
    }

    /// Replaces the CA's certificate and key files (key first, each by
    /// rename, as a Secret update or an operator would).
    fn replace_ca(&self, cert_pem: &str, key_pem: &str) -> Result<()> {
        write_atomically(&self.ca_key, key_pem.as_bytes())?;
        write_atomically(&self.ca_cert, cert_pem.as_bytes())
    }
}

/// TokenReview as the API server answers it for bound service account
/// tokens: the user is `system:serviceaccount:<ns>:<sa>` with the pod name,
/// uid and node name in `extra`; unknown tokens and other audiences are not
/// authenticated.
fn review_token(tokens: &Tokens, review: &TokenReview) -> TokenReviewStatus {
    let token = review.spec.token.clone().unwrap_or_default();
    let audiences = review.spec.audiences.clone().unwrap_or_default();
    let Some(bound) = tokens.lock().unwrap().get(&token).cloned() else {
        return TokenReviewStatus {
            authenticated: Some(false),
            error: Some(
                "[invalid bearer token, square/go-jose: error in cryptographic primitive]".into(),
            ),
            ..Default::default()
        };
    };
    if !audiences.iter().any(|a| a == AUDIENCE) {
        return TokenReviewStatus {
            authenticated: Some(false),
            error: Some(format!(
                "[invalid bearer token, token audiences [\"{AUDIENCE}\"] is invalid for the target audiences {audiences:?}]"
            )),
            ..Default::default()
        };
    }
    let extra = [
        ("authentication.kubernetes.io/pod-name", bound.pod),
        ("authentication.kubernetes.io/pod-uid", bound.uid),
        ("authentication.kubernetes.io/node-name", bound.node),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), vec![v]))
    .collect();
    TokenReviewStatus {
        authenticated: Some(true),
        audiences: Some(vec![AUDIENCE.into()]),
        user: Some(UserInfo {
            username: Some(format!(
                "system:serviceaccount:{}:{}",
                bound.namespace, bound.service_account
            )),
            uid: Some(format!("sa-uid-{}", bound.service_account)),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{}", bound.namespace),
            ]),
            extra: Some(extra),
        }),
        error: None,
    }
}

/// A kubeconfig for the fake API server (plain HTTP, no credentials).
fn kubeconfig_yaml(server: &str) -> String {
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: fake\n  cluster:\n    server: {server}\n\
         users:\n\
         - name: fake\n  user: {{}}\n\
         contexts:\n\
         - name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
         current-context: fake\n"
    )
}

/// The kubelet's `csi.storage.k8s.io/serviceAccount.tokens` for one token.
fn tokens_json(token: &str) -> String {
    serde_json::json!({
        AUDIENCE: {"token": token, "expirationTimestamp": "2099-01-01T00:00:00Z"}
    })
    .to_string()
}

/// A new self-signed CA root: (certificate PEM, PKCS#8 key PEM).
fn new_root() -> Result<(String, String)> {
    let (_, cert, key) = Authority::generate_self_signed_with_pems(Policy::new("cluster.local"))?;
    Ok((cert, key.to_string()))
}

fn write_atomically(path: &Path, contents: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    fs::write(&tmp, contents).with_context(|| format!("write {}", path.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("rename onto {}", path.display()))?;
    Ok(())
}

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

/// `credlet-under-test ca` in a [`TestEnv`] (log capture; killed, with its
/// log printed, when a test fails).
struct CaProcess {
    env: TestEnv,
    port: u16,
    args: Vec<OsString>,
}

impl CaProcess {
    fn new(cluster: &Cluster) -> Result<Self> {
        let env = TestEnv::new(agent_bin!());
        let port = free_port()?;
        let args: Vec<OsString> = vec![
            "ca".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}").into(),
            "--ca-cert".into(),
            cluster.ca_cert.clone().into(),
            "--ca-key".into(),
            cluster.ca_key.clone().into(),
            "--token-audience".into(),
            AUDIENCE.into(),
            "--agent-service-account".into(),
            format!("{AGENT_NAMESPACE}/{AGENT_SERVICE_ACCOUNT}").into(),
            "--server-name".into(),
            "127.0.0.1".into(),
            "--server-name".into(),
            "localhost".into(),
            "--dns-template".into(),
            DNS_TEMPLATE.into(),
            "--kubeconfig".into(),
            cluster.kubeconfig.clone().into(),
            "--drain-timeout-s".into(),
            "30".into(),
        ];
        Ok(Self { env, port, args })
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Starts the CA and waits until it accepts TCP connections.
    async fn start(&mut self) {
        let mut command = self.env.command();
        command.args(&self.args);
        self.env.spawn_command(command);
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(self.env.agent_running(), "credlet ca exited at start-up");
            if self.env.log().contains("CA service listening")
                && tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "credlet ca not listening after {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_len(&self) -> u64 {
        fs::metadata(&self.env.log_path).map_or(0, |m| m.len())
    }
}

/// `credlet-under-test agent --ca-url ...` in a [`TestEnv`].
fn agent_command(env: &TestEnv, cluster: &Cluster, ca: &CaProcess) -> std::process::Command {
    let mut command = env.command();
    command
        .arg("agent")
        .arg("--csi-endpoint")
        .arg(&env.socket)
        .arg("--node-id")
        .arg(NODE)
        .arg("--state-dir")
        .arg(&env.state_dir)
        .arg("--kubelet-root")
        .arg(&env.root)
        .arg("--token-audience")
        .arg(AUDIENCE)
        .arg("--ca-url")
        .arg(ca.url())
        .arg("--ca-trust")
        .arg(&cluster.ca_trust)
        .arg("--ca-token-file")
        .arg(&cluster.agent_token_file)
        .arg("--ca-timeout-ms")
        .arg(CA_TIMEOUT.as_millis().to_string())
        // What a DaemonSet would pass; the agent only uses it for the image
        // guard, which is off here.
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig);
    command
}

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
    let mut ca = CaProcess::new(&cluster)?;
    ca.start().await;
    let agent_token = cluster.agent_pod()?;

    // The agent starts before its token is projected: it serves CSI but is
    // not ready, and a publish is refused before anything touches the disk.
    let mut agent = TestEnv::new(agent_bin!());
    let command = agent_command(&agent, &cluster, &ca);
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

    // A pod certificate: identity from the verified token, chained to the
    // CA's root, on a tmpfs.
    let (a, a_token) = cluster.app(&agent, "a")?;
    csi.publish(&a).await.expect("publish web-a");
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
    let command = agent_command(&agent, &cluster, &ca);
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
    let mut ca = CaProcess::new(&cluster)?;
    ca.start().await;
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
