//! A cluster for `credlet ca` and `credlet agent --ca-url` as real
//! processes: the in-process fake Kubernetes API server answering the CA's
//! TokenReviews and pod GETs, the files both processes read (kubeconfig, CA
//! certificate and key, the agent's trust bundle and projected token), and
//! the command lines. Shared by `tests/remote_ca.rs` and `credlet-bench`.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use credlet_ca::{Authority, Policy};
use credlet_test_util::sa_token::{BoundClaims, ServiceAccountIssuer};
use credlet_test_util::{FakeApiServer, free_port};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewStatus, UserInfo};

use crate::harness::{NAMESPACE, Pod, SERVICE_ACCOUNT, TestEnv, Volume};

/// The audience of every token here (`--token-audience` of both processes).
pub const AUDIENCE: &str = "credlet-ca";
/// The service account issuer (`iss`) of every token here; the fake API
/// server publishes its keys (`--token-verification jwks`).
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The node the agent runs on and every pod is scheduled to.
pub const NODE: &str = "node-a";
/// The agent's pod and service account (passed to the CA as
/// `--agent-service-account credlet/credlet-agent`).
pub const AGENT_NAMESPACE: &str = "credlet";
/// The agent's service account.
pub const AGENT_SERVICE_ACCOUNT: &str = "credlet-agent";
/// The agent's pod.
pub const AGENT_POD: &str = "credlet-agent-node-a";
/// The agent's `--ca-timeout`.
pub const CA_TIMEOUT: Duration = Duration::from_millis(2000);
/// The DNS SAN template the volumes ask for and the CA allows.
pub const DNS_TEMPLATE: &str = "$POD_NAME.$POD_NAMESPACE.svc";
/// How long the CA may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// What the API server knows about one token.
#[derive(Clone, Debug)]
pub struct BoundToken {
    /// The service account's namespace.
    pub namespace: String,
    /// The service account.
    pub service_account: String,
    /// The pod the token is bound to.
    pub pod: String,
    /// That pod's uid.
    pub uid: String,
    /// The pod's node.
    pub node: String,
}

/// Tokens the TokenReview answers for.
pub type Tokens = Arc<Mutex<HashMap<String, BoundToken>>>;

/// The fake API server (TokenReview + pods) and the files both processes
/// read: kubeconfig, CA certificate and key, the agent's trust bundle and
/// its projected token.
#[derive(Debug)]
pub struct Cluster {
    /// The fake API server (its request log counts TokenReviews and pod
    /// GETs).
    pub api: FakeApiServer,
    tokens: Tokens,
    /// Signs every token; its keys are served at `GET /openid/v1/jwks`.
    pub issuer: ServiceAccountIssuer,
    _dir: tempfile::TempDir,
    /// Kubeconfig for the fake API server.
    pub kubeconfig: PathBuf,
    /// The CA's `--ca-cert`.
    pub ca_cert: PathBuf,
    /// The CA's `--ca-key`.
    pub ca_key: PathBuf,
    /// The agent's `--ca-trust`: the first root, never rewritten.
    pub ca_trust: PathBuf,
    /// The agent's `--ca-token-file`.
    pub agent_token_file: PathBuf,
    /// The first CA root, PEM.
    pub root_pem: String,
}

impl Cluster {
    /// Starts the fake API server and writes a new CA root and the files.
    pub fn start() -> Result<Self> {
        let api = FakeApiServer::start()?;
        let tokens: Tokens = Arc::default();
        let reviewer = Arc::clone(&tokens);
        api.set_token_reviewer(move |review: &TokenReview| review_token(&reviewer, review));
        let issuer = ServiceAccountIssuer::es256(ISSUER)?;
        api.set_service_account_issuer(ISSUER, issuer.jwks());
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
            issuer,
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
    pub fn pod(&self, namespace: &str, name: &str, service_account: &str) -> Result<String> {
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

    /// A projected token for [`AUDIENCE`] bound to the pod, valid for an
    /// hour: a JWT signed by [`Cluster::issuer`] with the API server's
    /// claims (verifiable offline), and known to the TokenReview from now
    /// on.
    pub fn token(&self, bound: BoundToken) -> String {
        let token = self
            .issuer
            .mint(&BoundClaims {
                issuer: ISSUER.into(),
                audiences: vec![AUDIENCE.into()],
                namespace: bound.namespace.clone(),
                service_account: bound.service_account.clone(),
                pod: bound.pod.clone(),
                pod_uid: bound.uid.clone(),
                node: bound.node.clone(),
                lifetime_s: 3600,
            })
            .expect("an ES256 signature");
        self.tokens.lock().unwrap().insert(token.clone(), bound);
        token
    }

    /// The agent's pod and its token (not yet in the token file).
    pub fn agent_pod(&self) -> Result<String> {
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
    pub fn write_agent_token(&self, token: &str) -> Result<()> {
        write_atomically(&self.agent_token_file, token.as_bytes())
    }

    /// An application pod `web-<name>` in [`NAMESPACE`] with service
    /// account [`SERVICE_ACCOUNT`] on [`NODE`] in the API server and its
    /// token: (pod, token).
    pub fn app_pod(&self, name: &str) -> Result<(Pod, String)> {
        let pod_name = format!("web-{name}");
        let uid = self.pod(NAMESPACE, &pod_name, SERVICE_ACCOUNT)?;
        let token = self.token(BoundToken {
            namespace: NAMESPACE.into(),
            service_account: SERVICE_ACCOUNT.into(),
            pod: pod_name.clone(),
            uid: uid.clone(),
            node: NODE.into(),
        });
        let pod = Pod {
            name: pod_name,
            namespace: NAMESPACE.into(),
            uid,
            service_account: SERVICE_ACCOUNT.into(),
        };
        Ok((pod, token))
    }

    /// An application pod (see [`Cluster::app_pod`]), its token, and its
    /// inline volume as the kubelet would publish it (target parent
    /// created, the token map in the volume context).
    pub fn app(&self, env: &TestEnv, name: &str) -> Result<(Volume, String)> {
        let (pod, token) = self.app_pod(name)?;
        let target = env.target_path(&pod.uid, "certs");
        fs::create_dir_all(target.parent().context("target parent")?)?;
        let volume = Volume {
            id: format!("csi-{name}"),
            target,
            pod,
            attributes: Default::default(),
            volume_mount_group: String::new(),
            tokens: Some(tokens_json(&token)),
        }
        .with("credlet.io/dns-names", DNS_TEMPLATE);
        Ok((volume, token))
    }

    /// Replaces the CA's certificate and key files (key first, each by
    /// rename, as a Secret update or an operator would).
    pub fn replace_ca(&self, cert_pem: &str, key_pem: &str) -> Result<()> {
        write_atomically(&self.ca_key, key_pem.as_bytes())?;
        write_atomically(&self.ca_cert, cert_pem.as_bytes())
    }

    /// (TokenReviews, pod GETs) the API server has answered so far.
    pub fn api_calls(&self) -> (usize, usize) {
        let requests = self.api.requests();
        let reviews = requests
            .iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/tokenreviews"))
            .count();
        let pod_gets = requests
            .iter()
            .filter(|r| r.method == "GET" && r.path.contains("/pods/"))
            .count();
        (reviews, pod_gets)
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
pub fn kubeconfig_yaml(server: &str) -> String {
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

/// The kubelet's `csi.storage.k8s.io/serviceAccount.tokens` for one token
/// minted now: it expires in an hour, as [`Cluster::token`]'s do.
pub fn tokens_json(token: &str) -> String {
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64 + 3600)
        .unwrap_or(0);
    let expires = k8s_openapi::jiff::Timestamp::from_second(expires)
        .map(|t| t.to_string())
        .unwrap_or_default();
    serde_json::json!({
        AUDIENCE: {"token": token, "expirationTimestamp": expires}
    })
    .to_string()
}

/// A new self-signed CA root: (certificate PEM, PKCS#8 key PEM).
pub fn new_root() -> Result<(String, String)> {
    let (_, cert, key) = Authority::generate_self_signed_with_pems(Policy::new("cluster.local"))?;
    Ok((cert, key.to_string()))
}

/// Writes `contents` to `path` through a temporary name and a rename.
pub fn write_atomically(path: &Path, contents: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    fs::write(&tmp, contents).with_context(|| format!("write {}", path.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("rename onto {}", path.display()))?;
    Ok(())
}

// --- the processes -------------------------------------------------------------

/// `credlet-under-test ca` in a [`TestEnv`] (log capture; killed, with its
/// log printed, when a test fails).
#[derive(Debug)]
pub struct CaProcess {
    /// Its environment (process, log).
    pub env: TestEnv,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    /// Its arguments; more may be pushed before [`CaProcess::start`].
    pub args: Vec<OsString>,
}

impl CaProcess {
    /// The `credlet ca` command line for `cluster` with the binary `bin`,
    /// on a free port (not started).
    pub fn new(bin: impl Into<PathBuf>, cluster: &Cluster) -> Result<Self> {
        let env = TestEnv::new(bin);
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
            "--drain-timeout".into(),
            "30s".into(),
            // Off: a busy port is fatal, and tests run CAs side by side
            // (`set_arg` turns it on).
            "--metrics-listen".into(),
            "".into(),
        ];
        Ok(Self { env, port, args })
    }

    /// Sets `flag` to `value`, replacing its earlier value; `None` removes
    /// it (its default applies).
    pub fn set_arg(&mut self, flag: &str, value: Option<&str>) {
        if let Some(at) = self.args.iter().position(|a| a.to_str() == Some(flag)) {
            self.args.drain(at..at + 2);
        }
        if let Some(value) = value {
            self.args.push(flag.into());
            self.args.push(value.into());
        }
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Starts the CA and waits until it accepts TCP connections.
    pub async fn start(&mut self) -> Result<()> {
        let mut command = self.env.command();
        command.args(&self.args);
        self.env.spawn_command(command);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if !self.env.agent_running() {
                bail!("credlet ca exited at start-up");
            }
            if self.env.log().contains("CA service listening")
                && tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("credlet ca not listening after {START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The length of its log so far (an offset for
    /// [`TestEnv::log_from`]).
    pub fn log_len(&self) -> u64 {
        fs::metadata(&self.env.log_path).map_or(0, |m| m.len())
    }
}

/// `credlet-under-test agent --ca-url ...` in a [`TestEnv`].
pub fn agent_command(env: &TestEnv, cluster: &Cluster, ca: &CaProcess) -> std::process::Command {
    agent_command_for_url(env, cluster, &ca.url())
}

/// [`agent_command`] with any `--ca-url` (a server that may not be the CA).
pub fn agent_command_for_url(env: &TestEnv, cluster: &Cluster, url: &str) -> std::process::Command {
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
        .arg(url)
        .arg("--ca-trust")
        .arg(&cluster.ca_trust)
        .arg("--ca-token-file")
        .arg(&cluster.agent_token_file)
        .arg("--ca-timeout")
        .arg(format!("{}s", CA_TIMEOUT.as_secs()))
        // What a DaemonSet would pass; the agent only uses it for the image
        // guard, which is off here.
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig);
    command
}
