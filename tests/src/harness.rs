//! A throw-away node for one test: a temporary kubelet root and state
//! directory, the agent binary running against them, a CSI client over its
//! Unix socket, and checks of what ends up on disk and in the mount table.
//!
//! Every [`TestEnv`] has its own directory, socket and log, so tests run in
//! parallel. Dropping it kills the agent and lazily unmounts whatever is
//! still mounted below its directory; when the test is failing it prints
//! the agent's log.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail, ensure};
use credlet_ca::CertificateInfo;
use credlet_proto::csi::identity_client::IdentityClient;
use credlet_proto::csi::node_client::NodeClient;
use credlet_proto::csi::volume_capability::{self, AccessType, MountVolume};
use credlet_proto::csi::{
    NodePublishVolumeRequest, NodeUnpublishVolumeRequest, ProbeRequest, VolumeCapability,
};
use tonic::transport::{Channel, Endpoint, Uri};

/// The driver name the agent uses unless told otherwise.
pub const DRIVER_NAME: &str = "csi.credlet.io";
/// The trust domain the agent uses unless told otherwise.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// The node id every [`TestEnv`] passes.
pub const NODE_ID: &str = "node-under-test";
/// Namespace of every test pod.
pub const NAMESPACE: &str = "shop";
/// Service account of every test pod.
pub const SERVICE_ACCOUNT: &str = "web";
/// How long an agent may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Kubelet volume-context keys (`podInfoOnMount`, `tokenRequests`).
pub mod keys {
    /// Pod name.
    pub const POD_NAME: &str = "csi.storage.k8s.io/pod.name";
    /// Pod namespace.
    pub const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
    /// Pod UID.
    pub const POD_UID: &str = "csi.storage.k8s.io/pod.uid";
    /// Service account name.
    pub const SERVICE_ACCOUNT_NAME: &str = "csi.storage.k8s.io/serviceAccount.name";
    /// Service account tokens, JSON.
    pub const TOKENS: &str = "csi.storage.k8s.io/serviceAccount.tokens";
    /// Inline (ephemeral) volume marker.
    pub const EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";
}

// ---------------------------------------------------------------------------
// The environment and the agent process
// ---------------------------------------------------------------------------

/// A running agent process.
#[derive(Debug)]
pub struct Agent {
    child: Child,
    /// When it was spawned.
    pub spawned_at: Instant,
}

impl Agent {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// One test's node: directories, socket, log and (maybe) a running agent.
#[derive(Debug)]
pub struct TestEnv {
    bin: PathBuf,
    /// The kubelet root (canonical) passed as `--kubelet-root`.
    pub root: PathBuf,
    /// The agent's `--state-dir`.
    pub state_dir: PathBuf,
    /// The CSI socket.
    pub socket: PathBuf,
    /// Where the agent's stdout and stderr go (appended across restarts).
    pub log_path: PathBuf,
    /// A directory outside the kubelet root, for escape attempts.
    pub outside: PathBuf,
    /// Extra arguments for every agent start.
    pub extra_args: Vec<String>,
    agent: Option<Agent>,
    starts: AtomicU32,
    // Last: removed after `Drop::drop` has unmounted everything below it.
    dir: tempfile::TempDir,
}

impl TestEnv {
    /// A fresh environment for the agent binary `bin`; nothing runs yet.
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("credlet-test-")
            .tempdir()
            .expect("create temporary directory");
        let base = dir.path().canonicalize().expect("canonicalize temp dir");
        let root = base.join("kubelet");
        let outside = base.join("outside");
        fs::create_dir_all(root.join("pods")).expect("create kubelet root");
        fs::create_dir_all(&outside).expect("create outside dir");
        Self {
            bin: bin.into(),
            state_dir: base.join("state"),
            socket: base.join("plugins/csi.credlet.io/csi.sock"),
            log_path: base.join("agent.log"),
            root,
            outside,
            extra_args: Vec::new(),
            agent: None,
            starts: AtomicU32::new(0),
            dir,
        }
    }

    /// The temporary directory holding everything.
    pub fn base(&self) -> &Path {
        self.dir.path()
    }

    /// The agent binary.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The arguments of `credlet agent` for this environment.
    pub fn agent_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "agent".into(),
            "--csi-endpoint".into(),
            self.socket.clone().into(),
            "--node-id".into(),
            NODE_ID.into(),
            "--state-dir".into(),
            self.state_dir.clone().into(),
            "--kubelet-root".into(),
            self.root.clone().into(),
            "--dev-ca".into(),
        ];
        args.extend(self.extra_args.iter().map(OsString::from));
        args
    }

    /// A command for the agent binary with output going to the log file.
    pub fn command(&self) -> Command {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open agent log");
        let err = log.try_clone().expect("clone log handle");
        let mut command = Command::new(&self.bin);
        command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1");
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CREDLET_") {
                command.env_remove(key);
            }
        }
        command
    }

    /// Starts the agent (without waiting for it to be ready).
    pub fn spawn(&mut self) {
        let mut command = self.command();
        command.args(self.agent_args());
        self.spawn_command(command);
    }

    /// Starts the agent from a prepared command (see [`TestEnv::command`]).
    pub fn spawn_command(&mut self, mut command: Command) {
        assert!(self.agent.is_none(), "agent already running");
        let n = self.starts.fetch_add(1, Ordering::Relaxed) + 1;
        append_log(
            &self.log_path,
            &format!("==== harness: agent start #{n} ===="),
        );
        let child = command.spawn().expect("spawn agent");
        self.agent = Some(Agent {
            child,
            spawned_at: Instant::now(),
        });
    }

    /// Starts the agent and waits until it is ready.
    pub async fn start(&mut self) -> Csi {
        self.spawn();
        self.wait_ready().await
    }

    /// The running agent.
    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent not running")
    }

    /// Whether an agent process is running (not yet reaped).
    pub fn agent_running(&mut self) -> bool {
        match self.agent.as_mut() {
            None => false,
            Some(agent) => agent.child.try_wait().ok().flatten().is_none(),
        }
    }

    /// Waits until the socket accepts and `Probe` says ready; returns a
    /// connected client. Panics (printing the log) if the agent exits or
    /// the time runs out.
    pub async fn wait_ready(&mut self) -> Csi {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::from("socket not there yet");
        loop {
            let agent = self.agent.as_mut().expect("agent not started");
            if let Some(status) = agent.child.try_wait().expect("try_wait") {
                panic!("agent exited before becoming ready: {status}");
            }
            if self.socket.exists() {
                match Csi::connect(&self.socket).await {
                    Ok(csi) => match csi.probe().await {
                        Ok(Some(false)) => last = "Probe: not ready".into(),
                        Ok(_) => return csi,
                        Err(status) => last = format!("Probe: {status}"),
                    },
                    Err(e) => last = format!("connect: {e:#}"),
                }
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready after {READY_TIMEOUT:?}: {last}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends SIGTERM and waits for the exit (at most 30 s).
    pub async fn stop(&mut self) -> ExitStatus {
        signal(self.agent().pid(), rustix::process::Signal::TERM);
        self.wait_exit().await
    }

    /// Waits (at most 30 s) for the agent to exit by itself, e.g. after a
    /// signal the test sent; SIGKILLs it and panics if it does not.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let mut agent = self.agent.take().expect("agent not running");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = agent.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = agent.child.kill();
                let _ = agent.child.wait();
                panic!("agent did not exit within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILLs the agent and reaps it.
    pub fn kill(&mut self) {
        let mut agent = self.agent.take().expect("agent not running");
        let _ = agent.child.kill();
        agent.child.wait().expect("reap agent");
    }

    /// The agent's output so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The agent's output from byte `offset` on (for cheap tailing).
    pub fn log_from(&self, offset: u64) -> (String, u64) {
        let Ok(mut file) = fs::File::open(&self.log_path) else {
            return (String::new(), offset);
        };
        if file.seek(SeekFrom::Start(offset)).is_err() {
            return (String::new(), offset);
        }
        let mut buf = Vec::new();
        let _ = file.read_to_end(&mut buf);
        // Only whole lines.
        let end = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        buf.truncate(end);
        (
            String::from_utf8_lossy(&buf).into_owned(),
            offset + end as u64,
        )
    }

    /// The state record of a volume.
    pub fn state_file(&self, volume_id: &str) -> PathBuf {
        self.state_dir
            .join("volumes")
            .join(format!("{volume_id}.json"))
    }

    /// Names in `<state-dir>/volumes` (empty if it does not exist).
    pub fn state_files(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.state_dir.join("volumes"))
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// The kubelet's target path for volume `volume` of pod `pod_uid`.
    pub fn target_path(&self, pod_uid: &str, volume: &str) -> PathBuf {
        self.root
            .join("pods")
            .join(pod_uid)
            .join("volumes/kubernetes.io~csi")
            .join(volume)
            .join("mount")
    }

    /// A volume of its own pod, named after `name` (lowercase letters,
    /// digits and `-`), with the target's parent directories created the
    /// way the kubelet does.
    pub fn volume(&self, name: &str) -> Volume {
        let volume = self.volume_without_parent(name);
        fs::create_dir_all(volume.target.parent().expect("parent")).expect("create target parent");
        volume
    }

    /// Like [`TestEnv::volume`] but without creating the parent.
    pub fn volume_without_parent(&self, name: &str) -> Volume {
        let uid = format!("0f1e2d3c-7ad9-4cf1-{name}");
        Volume {
            id: format!("csi-{name}"),
            target: self.target_path(&uid, "certs"),
            pod: Pod {
                name: format!("web-{name}"),
                namespace: NAMESPACE.into(),
                uid,
                service_account: SERVICE_ACCOUNT.into(),
            },
            attributes: BTreeMap::new(),
            volume_mount_group: String::new(),
            tokens: None,
        }
    }

    /// Mounts below this environment's directory.
    pub fn mounts(&self) -> Vec<MountEntry> {
        mounts_under(self.base())
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.child.kill();
            let _ = agent.child.wait();
        }
        let left = unmount_all_under(self.dir.path());
        if std::thread::panicking() {
            let log = self.log();
            let tail = tail_chars(&log, 48 * 1024);
            eprintln!(
                "---- agent log {} (last {} of {} bytes) ----\n{tail}\n---- end of agent log ----",
                self.log_path.display(),
                tail.len(),
                log.len()
            );
            if left > 0 {
                eprintln!("harness: lazily unmounted {left} leftover mounts");
            }
        }
    }
}

fn tail_chars(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

fn append_log(path: &Path, line: &str) {
    use std::io::Write;
    if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{line}");
    }
}

/// Sends `signal` to process `pid`.
pub fn signal(pid: u32, signal: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).expect("pid fits"))
        .expect("non-zero pid");
    rustix::process::kill_process(pid, signal).expect("kill");
}

// ---------------------------------------------------------------------------
// Volumes and requests
// ---------------------------------------------------------------------------

/// A pod as `podInfoOnMount` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// UID.
    pub uid: String,
    /// Service account.
    pub service_account: String,
}

/// One inline volume as a kubelet would publish it.
#[derive(Clone, Debug)]
pub struct Volume {
    /// CSI volume id.
    pub id: String,
    /// Target path.
    pub target: PathBuf,
    /// The pod.
    pub pod: Pod,
    /// `credlet.io/` (and any other) attributes.
    pub attributes: BTreeMap<String, String>,
    /// `volume_mount_group` of the mount capability ("" for none).
    pub volume_mount_group: String,
    /// `csi.storage.k8s.io/serviceAccount.tokens`, if sent.
    pub tokens: Option<String>,
}

impl Volume {
    /// Adds (or replaces) an attribute.
    pub fn with(mut self, key: &str, value: &str) -> Self {
        self.attributes.insert(key.to_owned(), value.to_owned());
        self
    }

    /// The volume context the kubelet would send.
    pub fn context(&self) -> HashMap<String, String> {
        let mut context: HashMap<String, String> = self
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        context.insert(keys::POD_NAME.into(), self.pod.name.clone());
        context.insert(keys::POD_NAMESPACE.into(), self.pod.namespace.clone());
        context.insert(keys::POD_UID.into(), self.pod.uid.clone());
        context.insert(
            keys::SERVICE_ACCOUNT_NAME.into(),
            self.pod.service_account.clone(),
        );
        context.insert(keys::EPHEMERAL.into(), "true".into());
        if let Some(tokens) = &self.tokens {
            context.insert(keys::TOKENS.into(), tokens.clone());
        }
        context
    }

    /// The `NodePublishVolume` request.
    pub fn request(&self) -> NodePublishVolumeRequest {
        NodePublishVolumeRequest {
            volume_id: self.id.clone(),
            target_path: self.target.to_string_lossy().into_owned(),
            volume_capability: Some(mount_capability(&self.volume_mount_group)),
            readonly: true,
            volume_context: self.context(),
            ..Default::default()
        }
    }

    /// The file names this volume's attributes ask for.
    pub fn files(&self) -> FileNames {
        let get = |key: &str, default: &str| {
            self.attributes
                .get(key)
                .cloned()
                .unwrap_or_else(|| default.to_owned())
        };
        FileNames {
            key: get("credlet.io/key-file", "tls.key"),
            certificate: get("credlet.io/certificate-file", "tls.crt"),
            ca: get("credlet.io/ca-file", "ca.crt"),
            bundle: self
                .attributes
                .get("credlet.io/credential-bundle-file")
                .cloned(),
        }
    }

    /// The default SPIFFE ID of this volume's pod.
    pub fn spiffe_id(&self) -> String {
        format!(
            "spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}",
            self.pod.namespace, self.pod.service_account
        )
    }
}

/// A filesystem (mount) capability, single node writer.
pub fn mount_capability(volume_mount_group: &str) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: String::new(),
            mount_flags: Vec::new(),
            volume_mount_group: volume_mount_group.to_owned(),
        })),
        access_mode: Some(volume_capability::AccessMode {
            mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

/// A block capability (which credlet must refuse).
pub fn block_capability() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Block(volume_capability::BlockVolume {})),
        access_mode: Some(volume_capability::AccessMode {
            mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

/// Names of the files in a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileNames {
    /// Private key.
    pub key: String,
    /// Leaf and intermediates.
    pub certificate: String,
    /// Trust bundle.
    pub ca: String,
    /// Optional key-then-chain bundle.
    pub bundle: Option<String>,
}

impl FileNames {
    /// Every name.
    pub fn all(&self) -> Vec<&str> {
        let mut names = vec![
            self.key.as_str(),
            self.certificate.as_str(),
            self.ca.as_str(),
        ];
        names.extend(self.bundle.as_deref());
        names
    }
}

// ---------------------------------------------------------------------------
// The CSI client
// ---------------------------------------------------------------------------

/// CSI Identity and Node clients over the agent's Unix socket.
#[derive(Clone, Debug)]
pub struct Csi {
    /// Node service.
    pub node: NodeClient<Channel>,
    /// Identity service.
    pub identity: IdentityClient<Channel>,
}

/// A gRPC channel over the Unix socket at `path` (as the kubelet dials its
/// plugins).
pub async fn unix_channel(path: &Path) -> Result<Channel> {
    let path = path.to_owned();
    let channel = Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await?;
    Ok(channel)
}

impl Csi {
    /// Connects to the socket at `path`.
    pub async fn connect(path: &Path) -> Result<Self> {
        let channel = unix_channel(path)
            .await
            .context("connect to the CSI socket")?;
        Ok(Self {
            node: NodeClient::new(channel.clone()),
            identity: IdentityClient::new(channel),
        })
    }

    /// `Probe`: `Some(ready)`, or `None` when the field is unset.
    pub async fn probe(&self) -> Result<Option<bool>, tonic::Status> {
        let response = self.identity.clone().probe(ProbeRequest {}).await?;
        Ok(response.into_inner().ready)
    }

    /// `NodePublishVolume` for a volume.
    pub async fn publish(&self, volume: &Volume) -> Result<(), tonic::Status> {
        self.publish_request(volume.request()).await
    }

    /// `NodePublishVolume` with an arbitrary request.
    pub async fn publish_request(
        &self,
        request: NodePublishVolumeRequest,
    ) -> Result<(), tonic::Status> {
        self.node.clone().node_publish_volume(request).await?;
        Ok(())
    }

    /// `NodeUnpublishVolume`.
    pub async fn unpublish(&self, volume_id: &str, target: &Path) -> Result<(), tonic::Status> {
        self.node
            .clone()
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: volume_id.to_owned(),
                target_path: target.to_string_lossy().into_owned(),
            })
            .await?;
        Ok(())
    }

    /// `NodeUnpublishVolume` for a volume.
    pub async fn unpublish_volume(&self, volume: &Volume) -> Result<(), tonic::Status> {
        self.unpublish(&volume.id, &volume.target).await
    }
}

// ---------------------------------------------------------------------------
// Reading and checking volume files
// ---------------------------------------------------------------------------

/// What a reader sees in a volume at one moment.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Where `..data` points (`..<timestamp>`).
    pub data_dir: String,
    /// Private key PEM.
    pub key: String,
    /// Chain PEM.
    pub chain: String,
    /// Trust bundle PEM.
    pub ca: String,
    /// Credential bundle PEM, if the volume has one.
    pub bundle: Option<String>,
    /// The leaf certificate.
    pub leaf: CertificateInfo,
}

/// Reads a volume's files through their visible names. `..data` is read
/// before and after; if a rotation swapped it in between, the read is
/// repeated, so the result is one payload's files (as the AtomicWriter
/// promises to a reader that checks).
pub fn read_volume(target: &Path, files: &FileNames) -> Result<Snapshot> {
    let data_link = target.join("..data");
    let mut last_error = None;
    for _ in 0..200 {
        let before =
            fs::read_link(&data_link).with_context(|| format!("read {}", data_link.display()))?;
        let read = |name: &str| {
            fs::read_to_string(target.join(name))
                .with_context(|| format!("read {}", target.join(name).display()))
        };
        let contents = (|| -> Result<_> {
            let key = read(&files.key)?;
            let chain = read(&files.certificate)?;
            let ca = read(&files.ca)?;
            let bundle = files.bundle.as_deref().map(read).transpose()?;
            Ok((key, chain, ca, bundle))
        })();
        let after = fs::read_link(&data_link).ok();
        if after.as_ref() != Some(&before) {
            // A rotation happened while reading: try again.
            last_error = Some(anyhow!("..data changed while reading"));
            continue;
        }
        let (key, chain, ca, bundle) = contents?;
        let leaf = credlet_ca::inspect_leaf(&chain).context("parse leaf certificate")?;
        return Ok(Snapshot {
            data_dir: before.to_string_lossy().into_owned(),
            key,
            chain,
            ca,
            bundle,
            leaf,
        });
    }
    Err(last_error.unwrap_or_else(|| anyhow!("no stable read")))
}

/// At what time to check a chain's validity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckTime {
    /// Now: the certificate must be valid at this moment.
    Now,
    /// Inside the leaf's validity window (signatures and chain only; used
    /// right after a restart of an agent with very short-lived certificates).
    WithinValidity,
}

/// Reads a volume and checks it is consistent: the layout is the
/// AtomicWriter's, the key is PKCS#8 and matches the leaf, the chain
/// verifies against the volume's trust bundle, and the credential bundle
/// (if any) is the key followed by the chain.
pub fn check_volume(target: &Path, files: &FileNames, at: CheckTime) -> Result<Snapshot> {
    check_layout(target, files)?;
    let snapshot = read_volume(target, files)?;
    ensure!(
        snapshot.key.starts_with("-----BEGIN PRIVATE KEY-----"),
        "{}: key is not a PKCS#8 PEM",
        target.display()
    );
    let matches = credlet_ca::key_matches_certificate(&snapshot.key, &snapshot.chain)
        .context("compare key and certificate")?;
    ensure!(
        matches,
        "{}: key does not match the certificate (serial {})",
        target.display(),
        snapshot.leaf.serial_hex
    );
    let when = match at {
        CheckTime::Now => SystemTime::now(),
        CheckTime::WithinValidity => {
            let leaf = &snapshot.leaf;
            let mid = leaf.not_before
                + leaf
                    .not_after
                    .duration_since(leaf.not_before)
                    .unwrap_or_default()
                    / 2;
            SystemTime::now().clamp(leaf.not_before, mid)
        }
    };
    credlet_ca::verify_chain(&snapshot.chain, &snapshot.ca, when).with_context(|| {
        format!(
            "{}: chain (serial {}) does not verify against ca.crt",
            target.display(),
            snapshot.leaf.serial_hex
        )
    })?;
    if let Some(bundle) = &snapshot.bundle {
        ensure!(
            *bundle == format!("{}{}", snapshot.key, snapshot.chain),
            "{}: credential bundle is not the key followed by the chain",
            target.display()
        );
    }
    Ok(snapshot)
}

/// Checks the AtomicWriter layout: `..data` → `..<something>` (a real
/// directory in the volume) and every visible name → `..data/<name>`.
pub fn check_layout(target: &Path, files: &FileNames) -> Result<()> {
    let data = fs::read_link(target.join("..data"))
        .with_context(|| format!("{}: ..data is not a symlink", target.display()))?;
    let data = data.to_string_lossy();
    ensure!(
        data.starts_with("..") && !data.contains('/') && data != "..data",
        "{}: ..data points at {data:?}",
        target.display()
    );
    let payload = fs::symlink_metadata(target.join(&*data))
        .with_context(|| format!("{}: payload {data} missing", target.display()))?;
    ensure!(
        payload.is_dir(),
        "{}: payload {data} is not a directory",
        target.display()
    );
    for name in files.all() {
        let link = fs::read_link(target.join(name))
            .with_context(|| format!("{}: {name} is not a symlink", target.display()))?;
        ensure!(
            link == Path::new("..data").join(name),
            "{}: {name} points at {}",
            target.display(),
            link.display()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The mount table
// ---------------------------------------------------------------------------

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// Mount point.
    pub mount_point: PathBuf,
    /// Filesystem type.
    pub fstype: String,
    /// Mount source (credlet names its tmpfs mounts `credlet`).
    pub source: String,
    /// Per-mount options (`nodev`, `nosuid`, `noexec`, ...).
    pub options: Vec<String>,
    /// Superblock options (`size=...`, `mode=...`, ...).
    pub super_options: Vec<String>,
}

impl MountEntry {
    /// Whether a per-mount or superblock option is present (`size` matches
    /// `size=1024k`).
    pub fn has_option(&self, name: &str) -> bool {
        self.options
            .iter()
            .chain(&self.super_options)
            .any(|o| o == name || o.split_once('=').is_some_and(|(k, _)| k == name))
    }
}

fn unescape_mount_path(raw: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

/// Parses the text of a `mountinfo` file.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fields: Vec<&str> = before.split(' ').collect();
            let after: Vec<&str> = after.split(' ').collect();
            Some(MountEntry {
                mount_point: unescape_mount_path(fields.get(4)?),
                options: fields.get(5)?.split(',').map(str::to_owned).collect(),
                fstype: (*after.first()?).to_owned(),
                source: (*after.get(1)?).to_owned(),
                super_options: after
                    .get(2)
                    .map(|o| o.split(',').map(str::to_owned).collect())
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// Every mount of this process's mount namespace.
pub fn mounts() -> Vec<MountEntry> {
    parse_mountinfo(&fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

/// Mounts at or below `prefix`.
pub fn mounts_under(prefix: &Path) -> Vec<MountEntry> {
    mounts()
        .into_iter()
        .filter(|m| m.mount_point.starts_with(prefix))
        .collect()
}

/// The topmost mount at exactly `path`.
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    mounts().into_iter().rev().find(|m| m.mount_point == path)
}

/// Lazily unmounts everything at or below `prefix` (deepest first);
/// returns how many mounts were detached.
pub fn unmount_all_under(prefix: &Path) -> usize {
    let mut count = 0;
    for _ in 0..16 {
        let mut points: Vec<PathBuf> = mounts_under(prefix)
            .into_iter()
            .map(|m| m.mount_point)
            .collect();
        if points.is_empty() {
            break;
        }
        points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        points.dedup();
        for point in points {
            if rustix::mount::unmount(&point, rustix::mount::UnmountFlags::DETACH).is_ok() {
                count += 1;
            }
        }
    }
    count
}

// ---------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------

/// Polls `probe` every 20 ms until it returns `Ok`; panics after `timeout`
/// with `what` and the last error.
pub async fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match probe() {
            Ok(value) => return value,
            Err(error) => {
                assert!(
                    Instant::now() < deadline,
                    "timed out after {timeout:?} waiting for {what}: {error:#}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the volume holds a consistent certificate whose serial is
/// not `old_serial`; returns it.
pub async fn wait_for_new_certificate(
    volume: &Volume,
    old_serial: &str,
    timeout: Duration,
) -> Snapshot {
    let files = volume.files();
    wait_until(
        &format!("a new certificate in {}", volume.id),
        timeout,
        || {
            let snapshot = read_volume(&volume.target, &files)?;
            if snapshot.leaf.serial_hex == old_serial {
                bail!("still serial {old_serial}");
            }
            check_volume(&volume.target, &files, CheckTime::Now)
        },
    )
    .await
}

// ---------------------------------------------------------------------------
// /proc figures (for the benchmark)
// ---------------------------------------------------------------------------

/// Resident set size of a process, in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow!("no VmRSS"))?;
    line.split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("bad VmRSS line"))?
        .parse()
        .context("parse VmRSS")
}

/// CPU time (user + system) a process used so far.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may contain spaces; fields resume after its ')'.
    let rest = &stat[stat.rfind(')').ok_or_else(|| anyhow!("bad stat"))? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after ')'.
    let utime: u64 = fields.get(11).ok_or_else(|| anyhow!("no utime"))?.parse()?;
    let stime: u64 = fields.get(12).ok_or_else(|| anyhow!("no stime"))?.parse()?;
    let hz = rustix::param::clock_ticks_per_second().max(1);
    Ok(Duration::from_secs_f64((utime + stime) as f64 / hz as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_parsing() {
        let text = "36 35 98:0 / /mnt/a\\040b rw,nosuid,nodev,noexec,relatime master:1 - tmpfs credlet rw,size=1024k,mode=755\n\
                    37 35 98:0 /x /var ro shared:2 - ext4 /dev/vda rw\n";
        let entries = parse_mountinfo(text);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].mount_point, Path::new("/mnt/a b"));
        assert_eq!(entries[0].fstype, "tmpfs");
        assert!(entries[0].has_option("nodev"));
        assert!(entries[0].has_option("noexec"));
        assert!(entries[0].has_option("size"));
        assert!(!entries[0].has_option("ro"));
        assert_eq!(entries[1].fstype, "ext4");
        assert!(entries[1].has_option("ro"));
    }

    #[test]
    fn cpu_and_rss_of_self() {
        let pid = std::process::id();
        assert!(rss_kib(pid).expect("rss") > 0);
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_time(pid).expect("cpu") > Duration::ZERO);
    }
}
