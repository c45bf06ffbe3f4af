//! A real one-node Kubernetes cluster on loopback, as root: etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler, containerd 2 and
//! the kubelet, built from their Go modules ([`Programs`]), with credlet's
//! image guard between the kubelet and containerd ([`Cluster::start`]) and
//! credlet itself installed from `deploy/` ([`Cluster::install_credlet`]).
//!
//! What makes a node run on loopback only:
//! - The node's name is its address, a 127.x.y.z picked per cluster
//!   directory: the kubelet refuses a loopback `--node-ip` but takes an IP
//!   given as its host name as the node's InternalIP. Host-network pods get
//!   that address; each cluster's listeners bind it, so two clusters (a
//!   test run and `cargo xtask cluster up`) do not collide.
//! - Other pods get their own network namespace from the harness's CNI
//!   plugin (`test-util/k8s/cni-loopback`): `lo` and an `eth0` with a
//!   127.64.x.y/32 address whose veth peer stays in the same namespace.
//!   Nothing routes out; pods that talk to each other use `hostNetwork`.
//! - There is no Service network (no kube-proxy, no cluster DNS): the API
//!   server runs with `--endpoint-reconciler-type=none`, and pods that
//!   need the API or a Service get its address explicitly (see
//!   [`credlet`](crate::cluster::Cluster::install_credlet)).
//! - The kubelet runs with cgroupfs on cgroup v1 (`failCgroupV1: false`)
//!   below its own cgroup root, its root directory is a shared bind mount
//!   (the agent's Bidirectional propagation needs it), and every path of
//!   every program lies below the cluster directory.
//!
//! Dropping a [`Cluster`] stops every process, container and mount and
//! removes its cgroups; [`Cluster::detach`] leaves it running for
//! `cargo xtask cluster up`, and [`teardown`] removes one left that way.

mod credlet;
mod images;
mod pki;
mod programs;

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustix::process::Signal;
use serde_json::json;

pub use credlet::{
    CredletInstall, CredletOptions, IMAGE as CREDLET_IMAGE, NAMESPACE as CREDLET_NAMESPACE,
    deploy_dir, new_credlet_root,
};
pub use images::{BUSYBOX_IMAGE, binary_files, busybox_spec};
pub use pki::{CertFiles, ClusterPki, write_kubeconfig};
pub use programs::{Programs, VERSION_ENV};

use crate::image::{PAUSE_IMAGE, write_pause_archive};
use crate::process::{
    Daemon, WorkDir, cleanup_dir, delete_runc_containers_with, free_port, log_tail, record_pid, run,
};

/// How long a component may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// What to start.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// A directory that outlives this process (`cargo xtask cluster up`);
    /// a swept temporary directory otherwise.
    pub dir: Option<PathBuf>,
    /// The `credlet` binary the image guard runs (`deploy/node`'s unit).
    /// Without it the kubelet talks to containerd directly.
    pub guard_binary: Option<PathBuf>,
    /// Extra `CREDLET_*` settings for the image guard (a registry CA, a
    /// policy), after the unit's own.
    pub guard_env: Vec<(String, String)>,
    /// The kubelet's `imagePullCredentialsVerificationPolicy`; the
    /// kubelet's default (`NeverVerifyPreloadedImages`) when unset.
    pub kubelet_image_verification: Option<String>,
    /// Registries containerd trusts: (host:port, CA PEM).
    pub registries: Vec<(String, String)>,
}

/// A running cluster. See the module documentation.
#[derive(Debug)]
pub struct Cluster {
    programs: Programs,
    pki: ClusterPki,
    node_ip: Ipv4Addr,
    api_port: u16,
    cgroup_root: String,
    opts: ClusterOptions,
    // Stopped in reverse start order on drop: kubelet first, etcd last.
    daemons: Vec<(&'static str, Daemon)>,
    detached: bool,
    dir: ClusterDir,
}

#[derive(Debug)]
enum ClusterDir {
    Temp(WorkDir),
    Persistent(PathBuf),
}

impl ClusterDir {
    fn path(&self) -> &Path {
        match self {
            Self::Temp(w) => w.path(),
            Self::Persistent(p) => p,
        }
    }
}

/// The 127.x.y.z address of the node of the cluster living in `dir`.
fn node_ip_for(dir: &Path) -> Ipv4Addr {
    let d = ring::digest::digest(&ring::digest::SHA256, dir.as_os_str().as_encoded_bytes());
    let b = d.as_ref();
    // 127.100.0.0/14, avoiding .0 and .255 in the last octet.
    Ipv4Addr::new(127, 100 + (b[0] % 4), b[1], 1 + b[2] % 254)
}

/// The cgroup v1 controllers the kubelet needs a root in.
const CGROUP_CONTROLLERS: &[&str] = &[
    "cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "devices", "freezer", "systemd",
];

impl Cluster {
    /// Starts etcd, the control plane, containerd, the image guard (with
    /// [`ClusterOptions::guard_binary`]) and the kubelet, and waits until
    /// the node is Ready.
    pub fn start(opts: ClusterOptions) -> Result<Self> {
        let programs = Programs::get()?;
        let dir = match &opts.dir {
            Some(p) => {
                if p.exists() && fs::read_dir(p)?.next().is_some() {
                    bail!(
                        "{} is not empty: a cluster may still live there (tear it down first)",
                        p.display()
                    );
                }
                fs::create_dir_all(p)?;
                ClusterDir::Persistent(p.canonicalize()?)
            }
            None => ClusterDir::Temp(WorkDir::new("cluster")?),
        };
        let d = dir.path().to_path_buf();
        let node_ip = node_ip_for(&d);
        let node = node_ip.to_string();
        let pki = ClusterPki::generate(&d.join("pki"), &node, IpAddr::V4(node_ip))?;
        let cgroup_root = format!("credlet-{}", node.replace('.', "-"));
        let mut me = Self {
            programs,
            pki,
            node_ip,
            api_port: 0,
            cgroup_root,
            opts,
            daemons: Vec::new(),
            detached: false,
            dir,
        };
        me.start_control_plane()
            .and_then(|()| me.start_node())
            .with_context(|| format!("start the cluster in {}", d.display()))?;
        Ok(me)
    }

    /// The cluster directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The node's name (also its address).
    pub fn node_name(&self) -> String {
        self.node_ip.to_string()
    }

    /// The node's address: host-network pods listen here.
    pub fn node_ip(&self) -> Ipv4Addr {
        self.node_ip
    }

    /// The API server URL.
    pub fn server(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }

    /// The API server port on 127.0.0.1.
    pub fn api_port(&self) -> u16 {
        self.api_port
    }

    /// The programs this cluster runs.
    pub fn programs(&self) -> &Programs {
        &self.programs
    }

    /// The cluster's PKI files.
    pub fn pki(&self) -> &ClusterPki {
        &self.pki
    }

    /// An admin kubeconfig (`system:masters`).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir().join("admin.kubeconfig")
    }

    /// The kubelet's root directory.
    pub fn kubelet_root(&self) -> PathBuf {
        self.dir().join("kubelet")
    }

    /// containerd's socket.
    pub fn containerd_socket(&self) -> PathBuf {
        self.dir().join("containerd/containerd.sock")
    }

    /// The image guard's socket (the kubelet's CRI endpoint), if it runs.
    pub fn guard_socket(&self) -> Option<PathBuf> {
        self.opts
            .guard_binary
            .as_ref()
            .map(|_| self.dir().join("guard/cri.sock"))
    }

    /// The image guard's record directory.
    pub fn guard_records_dir(&self) -> PathBuf {
        self.dir().join("guard/records")
    }

    /// A component's log file (`etcd`, `kube-apiserver`, `kubelet`,
    /// `containerd`, `image-guard`, ...).
    pub fn log_path(&self, component: &str) -> PathBuf {
        self.dir().join("logs").join(format!("{component}.log"))
    }

    /// A `kube::Client` with the admin kubeconfig (inside a Tokio runtime).
    pub async fn client(&self) -> Result<kube::Client> {
        let kc = kube::config::Kubeconfig::read_from(self.kubeconfig())?;
        let config =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Runs the cluster's own `kubectl` with the admin kubeconfig.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output> {
        run(self.kubectl_command().args(args))
    }

    /// `kubectl` with the admin kubeconfig, `args` and `stdin` as input.
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Result<Output> {
        use std::io::Write;
        use std::process::Stdio;
        let mut child = self
            .kubectl_command()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(stdin.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl {args:?} failed with {}:\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    fn kubectl_command(&self) -> Command {
        let mut cmd = Command::new(self.programs.kube("kubectl"));
        cmd.env("KUBECONFIG", self.kubeconfig());
        cmd
    }

    /// Runs the cluster's `ctr` in containerd's `k8s.io` namespace.
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        run(Command::new(self.programs.containerd.join("ctr"))
            .arg("--address")
            .arg(self.containerd_socket())
            .args(["--namespace", crate::CRI_NAMESPACE])
            .args(args))
    }

    /// Imports an OCI archive into containerd (the node then has the image
    /// without pulling it: "preloaded" to the kubelet and the guard).
    pub fn import_image(&self, archive: &Path) -> Result<()> {
        self.ctr(&["images", "import", &archive.to_string_lossy()])
            .map(|_| ())
            .with_context(|| format!("import {}", archive.display()))
    }

    /// Leaves every process running after this value is gone
    /// (`cargo xtask cluster up`); [`teardown`] stops them.
    pub fn detach(mut self) {
        self.detached = true;
        for (_, d) in self.daemons.drain(..) {
            d.detach();
        }
    }

    fn spawn(&mut self, name: &'static str, mut cmd: Command, graceful: Signal) -> Result<()> {
        let log = self.log_path(name);
        if matches!(self.dir, ClusterDir::Persistent(_)) {
            // Its own process group: a terminal's Ctrl-C or hang-up for the
            // command that started the cluster does not reach it.
            cmd.process_group(0);
        }
        let daemon = Daemon::spawn(name, cmd, &log, Some(graceful))?;
        if let Some(pid) = daemon.pid() {
            record_pid(self.dir(), name, pid)?;
        }
        self.daemons.push((name, daemon));
        Ok(())
    }

    fn daemon(&mut self, name: &str) -> Result<&mut Daemon> {
        self.daemons
            .iter_mut()
            .find(|(n, _)| *n == name)
            .map(|(_, d)| d)
            .with_context(|| format!("{name} is not running"))
    }

    fn start_control_plane(&mut self) -> Result<()> {
        let d = self.dir().to_path_buf();
        fs::create_dir_all(d.join("logs"))?;

        // etcd
        let client_port = free_port()?;
        let peer_port = free_port()?;
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut cmd = Command::new(self.programs.etcd.join("etcd"));
        cmd.arg("--name=default")
            .arg(format!("--data-dir={}", d.join("etcd").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=default={peer_url}"))
            .arg("--listen-metrics-urls=")
            // A test cluster: losing etcd data on a host crash is fine.
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn");
        self.spawn("etcd", cmd, Signal::TERM)?;
        self.daemon("etcd")?
            .wait_for_tcp(([127, 0, 0, 1], client_port).into(), START_TIMEOUT)?;

        // kube-apiserver
        self.api_port = free_port()?;
        let pki = self.pki.clone();
        let p = |path: &Path| path.display().to_string();
        let mut cmd = Command::new(self.programs.kube("kube-apiserver"));
        cmd.arg(format!("--etcd-servers={etcd_url}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={}", self.api_port))
            .arg(format!("--cert-dir={}", d.join("apiserver").display()))
            .arg(format!("--tls-cert-file={}", p(&pki.apiserver.cert)))
            .arg(format!("--tls-private-key-file={}", p(&pki.apiserver.key)))
            .arg(format!("--client-ca-file={}", p(&pki.ca_cert)))
            .arg(format!(
                "--kubelet-client-certificate={}",
                p(&pki.apiserver_kubelet_client.cert)
            ))
            .arg(format!(
                "--kubelet-client-key={}",
                p(&pki.apiserver_kubelet_client.key)
            ))
            .arg(format!(
                "--kubelet-certificate-authority={}",
                p(&pki.ca_cert)
            ))
            .arg("--kubelet-preferred-address-types=InternalIP")
            .arg("--authorization-mode=Node,RBAC")
            .arg("--enable-admission-plugins=NodeRestriction")
            .arg("--allow-privileged=true")
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!(
                "--service-account-key-file={}",
                p(&pki.service_account_key)
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                p(&pki.service_account_key)
            ))
            // No Service network here: ClusterIPs are only allocated, never
            // reached (pods get the API server's address explicitly), and
            // the `kubernetes` Service gets no loopback endpoints.
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .arg("--endpoint-reconciler-type=none")
            .arg(format!("--feature-gates={}", self.feature_gates()))
            .arg(format!("--runtime-config={}", self.runtime_config()))
            .arg("--profiling=false")
            .arg("--v=1");
        self.spawn("kube-apiserver", cmd, Signal::TERM)?;
        write_kubeconfig(&self.kubeconfig(), &self.server(), &pki.ca_cert, &pki.admin)?;
        self.wait_for("kube-apiserver", |me| {
            let out = me
                .kubectl_command()
                .args(["get", "--raw", "/readyz"])
                .output()
                .ok()?;
            out.status.success().then_some(())
        })?;

        // kube-controller-manager: ServiceAccounts, kube-root-ca.crt,
        // Deployments, DaemonSets, garbage collection, namespaces.
        let kc = d.join("controller-manager.kubeconfig");
        write_kubeconfig(&kc, &self.server(), &pki.ca_cert, &pki.controller_manager)?;
        let mut cmd = Command::new(self.programs.kube("kube-controller-manager"));
        // No serving port: nothing here scrapes or probes it.
        cmd.arg(format!("--kubeconfig={}", kc.display()))
            .arg("--secure-port=0")
            .arg(format!("--root-ca-file={}", p(&pki.ca_cert)))
            .arg(format!(
                "--service-account-private-key-file={}",
                p(&pki.service_account_key)
            ))
            // Each controller with its own service account and RBAC role,
            // as kubeadm runs it.
            .arg("--use-service-account-credentials=true")
            .arg("--leader-elect=false")
            .arg(format!("--feature-gates={}", self.feature_gates()))
            .arg("--v=1");
        self.spawn("kube-controller-manager", cmd, Signal::TERM)?;

        let kc = d.join("scheduler.kubeconfig");
        write_kubeconfig(&kc, &self.server(), &pki.ca_cert, &pki.scheduler)?;
        let mut cmd = Command::new(self.programs.kube("kube-scheduler"));
        cmd.arg(format!("--kubeconfig={}", kc.display()))
            .arg("--secure-port=0")
            .arg("--leader-elect=false")
            .arg(format!("--feature-gates={}", self.feature_gates()))
            .arg("--v=1");
        self.spawn("kube-scheduler", cmd, Signal::TERM)?;
        Ok(())
    }

    /// The feature gates every component gets: the PodCertificateRequest
    /// API and ClusterTrustBundles with their projections, beta and off by
    /// default before 1.37, where they are GA.
    fn feature_gates(&self) -> String {
        if self.programs.minor() >= 37 {
            return String::new();
        }
        "PodCertificateRequest=true,ClusterTrustBundle=true,ClusterTrustBundleProjection=true"
            .to_string()
    }

    /// The API groups to serve: `certificates.k8s.io/v1beta1` (PodCertificateRequest,
    /// ClusterTrustBundle in 1.35), and `v1alpha1` where a release still has them there.
    fn runtime_config(&self) -> String {
        "certificates.k8s.io/v1beta1=true".to_string()
    }

    fn start_node(&mut self) -> Result<()> {
        self.start_containerd()?;
        if self.opts.guard_binary.is_some() {
            self.start_guard()?;
        }
        self.start_kubelet()?;
        self.wait_for_node_ready()
    }

    fn start_containerd(&mut self) -> Result<()> {
        let c = self.dir().join("containerd");
        for sub in [
            "root", "state", "tmp", "opt", "runc", "certs.d", "cni/bin", "cni/conf",
        ] {
            fs::create_dir_all(c.join(sub))?;
        }
        let cni = c.join("cni/bin/credlet-loopback");
        fs::write(&cni, include_str!("../../k8s/cni-loopback"))?;
        set_mode(&cni, 0o755)?;
        fs::write(
            c.join("cni/conf/10-credlet-loopback.conflist"),
            json!({
                "cniVersion": "1.0.0",
                "name": "credlet-loopback",
                "plugins": [{"type": "credlet-loopback"}],
            })
            .to_string(),
        )?;
        for (host, ca) in &self.opts.registries {
            trust_registry(&c.join("certs.d"), host, ca)?;
        }
        fs::write(
            c.join("config.toml"),
            containerd_config(&c, &self.programs.runc),
        )?;
        let mut cmd = Command::new(self.programs.containerd.join("containerd"));
        cmd.arg("--config").arg(c.join("config.toml"));
        // Its shims are found on PATH: ours first.
        cmd.env("PATH", path_with(&self.programs.containerd))
            .env_remove("CONTAINERD_ADDRESS")
            .env_remove("CONTAINERD_NAMESPACE");
        self.spawn("containerd", cmd, Signal::TERM)?;
        let socket = self.containerd_socket();
        self.daemon("containerd")?
            .wait_for_unix(&socket, START_TIMEOUT)?;
        let archive = c.join("pause.tar");
        write_pause_archive(&c.join("pause-layout"), &archive)?;
        self.import_image(&archive)?;
        Ok(())
    }

    fn start_guard(&mut self) -> Result<()> {
        let g = self.dir().join("guard");
        fs::create_dir_all(g.join("records"))?;
        let binary = self.opts.guard_binary.clone().context("no guard binary")?;
        let mut cmd = Command::new(binary);
        cmd.arg("agent");
        // deploy/node's unit, with this node's paths.
        for (k, v) in guard_unit_environment()? {
            cmd.env(k, v);
        }
        let kubeconfig = self.dir().join("kubelet.kubeconfig");
        write_kubeconfig(
            &kubeconfig,
            &self.server(),
            &self.pki.ca_cert,
            &self.pki.kubelet_client,
        )?;
        let socket = g.join("cri.sock");
        cmd.env("CREDLET_NODE_ID", self.node_name())
            .env("CREDLET_CRI_LISTEN", format!("unix://{}", socket.display()))
            .env(
                "CREDLET_CRI_UPSTREAM",
                format!("unix://{}", self.containerd_socket().display()),
            )
            .env("CREDLET_IMAGE_RECORDS_DIR", g.join("records"))
            .env("CREDLET_KUBECONFIG", &kubeconfig)
            .env("CREDLET_HEALTH_LISTEN", format!("{}:9809", self.node_ip))
            .env("CREDLET_LOG_FORMAT", "text")
            .env("RUST_LOG", "info");
        for (k, v) in &self.opts.guard_env {
            cmd.env(k, v);
        }
        self.spawn("image-guard", cmd, Signal::TERM)?;
        self.daemon("image-guard")?
            .wait_for_unix(&socket, START_TIMEOUT)?;
        Ok(())
    }

    fn start_kubelet(&mut self) -> Result<()> {
        let d = self.dir().to_path_buf();
        let root = self.kubelet_root();
        if !crate::process::mount_points_below(&root).contains(&root) {
            fs::create_dir_all(&root)?;
            // A shared mount: Bidirectional propagation from the agent's
            // container back to the kubelet needs it.
            run(Command::new("mount").arg("--bind").arg(&root).arg(&root))?;
            run(Command::new("mount").arg("--make-rshared").arg(&root))?;
        }
        for c in CGROUP_CONTROLLERS {
            let base = Path::new("/sys/fs/cgroup").join(c);
            if base.is_dir() {
                fs::create_dir_all(base.join(&self.cgroup_root))
                    .with_context(|| format!("create cgroup {c}/{}", self.cgroup_root))?;
            }
        }
        // Host-network pods with dnsPolicy Default get this, not the host's.
        fs::write(
            d.join("resolv.conf"),
            "nameserver 127.0.0.1\noptions ndots:1 timeout:1 attempts:1\n",
        )?;
        let kubeconfig = d.join("kubelet.kubeconfig");
        write_kubeconfig(
            &kubeconfig,
            &self.server(),
            &self.pki.ca_cert,
            &self.pki.kubelet_client,
        )?;
        fs::write(d.join("kubelet-config.json"), self.kubelet_config()?)?;
        let mut cmd = Command::new(self.programs.kube("kubelet"));
        cmd.arg(format!(
            "--config={}",
            d.join("kubelet-config.json").display()
        ))
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg(format!("--hostname-override={}", self.node_name()))
        .arg(format!("--root-dir={}", root.display()))
        .arg(format!("--cert-dir={}", d.join("kubelet-pki").display()))
        .arg("--v=2");
        self.spawn("kubelet", cmd, Signal::TERM)?;
        Ok(())
    }

    fn kubelet_config(&self) -> Result<String> {
        let d = self.dir();
        let endpoint = match self.guard_socket() {
            Some(s) => format!("unix://{}", s.display()),
            None => format!("unix://{}", self.containerd_socket().display()),
        };
        let mut config = json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.node_ip.to_string(),
            "port": free_port()?,
            "readOnlyPort": 0,
            "healthzBindAddress": self.node_ip.to_string(),
            "healthzPort": free_port()?,
            "tlsCertFile": self.pki.kubelet_serving.cert,
            "tlsPrivateKeyFile": self.pki.kubelet_serving.key,
            "authentication": {
                "anonymous": {"enabled": false},
                "webhook": {"enabled": true},
                "x509": {"clientCAFile": self.pki.ca_cert},
            },
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": endpoint,
            "imageServiceEndpoint": endpoint,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": format!("/{}", self.cgroup_root),
            // This machine has cgroup v1, which 1.35 refuses by default.
            "failCgroupV1": false,
            "failSwapOn": false,
            "podLogsDir": d.join("pod-logs"),
            "resolvConf": d.join("resolv.conf"),
            "clusterDomain": "cluster.local",
            // No DNS server: pods' resolver points at their own loopback,
            // where nothing answers, instead of the host's.
            "clusterDNS": ["127.0.0.1"],
            "volumePluginDir": d.join("volume-plugins"),
            "registerNode": true,
            "syncFrequency": "10s",
            "fileCheckFrequency": "10s",
            "nodeStatusUpdateFrequency": "5s",
            // A shared CI disk must not get the node evicted or its images
            // collected mid-run.
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": false,
        });
        if self.programs.minor() < 37 {
            config["featureGates"] = json!({
                "PodCertificateRequest": true,
                "ClusterTrustBundle": true,
                "ClusterTrustBundleProjection": true,
            });
        }
        if let Some(policy) = &self.opts.kubelet_image_verification {
            config["imagePullCredentialsVerificationPolicy"] = json!(policy);
        }
        Ok(serde_json::to_string_pretty(&config)?)
    }

    /// Restarts the kubelet with another `imagePullCredentialsVerificationPolicy`
    /// (`None`: the kubelet's default). Running pods stay.
    pub fn restart_kubelet(&mut self, image_verification: Option<&str>) -> Result<()> {
        if let Some(i) = self.daemons.iter().position(|(n, _)| *n == "kubelet") {
            let (_, mut d) = self.daemons.remove(i);
            d.stop();
        }
        self.opts.kubelet_image_verification = image_verification.map(str::to_string);
        self.start_kubelet()?;
        self.wait_for_node_ready()
    }

    /// Stops the image guard (SIGTERM) and starts it again with the same
    /// settings and records.
    pub fn restart_guard(&mut self) -> Result<()> {
        if let Some(i) = self.daemons.iter().position(|(n, _)| *n == "image-guard") {
            let (_, mut d) = self.daemons.remove(i);
            d.stop();
        }
        self.start_guard()
    }

    fn wait_for_node_ready(&mut self) -> Result<()> {
        let node = self.node_name();
        self.wait_for("kubelet", |me| {
            let out = me
                .kubectl_command()
                .args([
                    "get",
                    "node",
                    &node,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                ])
                .output()
                .ok()?;
            (out.status.success() && out.stdout == b"True").then_some(())
        })
    }

    /// Polls `ready` every 250 ms until it answers, failing early with the
    /// log tail of whichever daemon died, or after [`START_TIMEOUT`] with
    /// `component`'s log tail.
    fn wait_for(
        &mut self,
        component: &str,
        mut ready: impl FnMut(&Self) -> Option<()>,
    ) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            for (_, d) in &mut self.daemons {
                d.check_running()?;
            }
            if ready(self).is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{component} not ready within {START_TIMEOUT:?}; log:\n{}",
                    log_tail(&self.log_path(component), 60)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        while let Some((_, mut d)) = self.daemons.pop() {
            d.stop();
        }
        teardown_dir(self.dir(), &self.cgroup_root, &self.programs.runc);
    }
}

/// Imports an OCI archive into the containerd of the cluster left running
/// in `dir` by [`Cluster::detach`].
pub fn import_image(dir: &Path, archive: &Path) -> Result<()> {
    let socket = dir.join("containerd/containerd.sock");
    if !socket.exists() {
        bail!("no cluster runs in {}", dir.display());
    }
    let programs = Programs::get()?;
    run(Command::new(programs.containerd.join("ctr"))
        .arg("--address")
        .arg(&socket)
        .args(["--namespace", crate::CRI_NAMESPACE, "images", "import"])
        .arg(archive))
    .map(|_| ())
    .with_context(|| format!("import {}", archive.display()))
}

/// Stops a cluster left running by [`Cluster::detach`] in `dir`: kills its
/// processes and containers, unmounts, removes its cgroups and the
/// directory.
pub fn teardown(dir: &Path) -> Result<()> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("no cluster in {}", dir.display()))?;
    let cgroup_root = format!(
        "credlet-{}",
        node_ip_for(&dir).to_string().replace('.', "-")
    );
    let runc = Programs::get().map_or_else(|_| PathBuf::from("runc"), |p| p.runc);
    teardown_dir(&dir, &cgroup_root, &runc);
    fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    Ok(())
}

fn teardown_dir(dir: &Path, cgroup_root: &str, runc: &Path) {
    // The kubelet and containerd first (recorded pids), so that nothing
    // starts containers again; then the containers with the runc that made
    // them; then shims, mounts and whatever else names the directory.
    cleanup_dir(dir, false);
    delete_runc_containers_with(runc, &dir.join("containerd/runc"));
    cleanup_dir(&dir.join("containerd"), false);
    cleanup_dir(dir, false);
    remove_cgroups(cgroup_root);
}

/// Removes the kubelet's cgroup tree, deepest first (a cgroup goes only
/// when it holds no process and no child).
fn remove_cgroups(cgroup_root: &str) {
    for c in CGROUP_CONTROLLERS {
        let top = Path::new("/sys/fs/cgroup").join(c).join(cgroup_root);
        let mut dirs = Vec::new();
        collect_dirs(&top, &mut dirs);
        dirs.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for d in dirs {
            let _ = fs::remove_dir(&d);
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    if !dir.is_dir() {
        return;
    }
    out.push(dir.to_path_buf());
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            collect_dirs(&e.path(), out);
        }
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn path_with(dir: &Path) -> String {
    match std::env::var("PATH") {
        Ok(p) if !p.is_empty() => format!("{}:{p}", dir.display()),
        _ => format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", dir.display()),
    }
}

/// `certs.d/<host>/hosts.toml` naming the registry's CA.
fn trust_registry(certs_d: &Path, host: &str, ca_pem: &str) -> Result<()> {
    let dir = certs_d.join(host);
    fs::create_dir_all(&dir)?;
    let ca = dir.join("ca.crt");
    fs::write(&ca, ca_pem)?;
    fs::write(
        dir.join("hosts.toml"),
        format!(
            "server = \"https://{host}\"\n\n[host.\"https://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"{}\"\n",
            ca.display()
        ),
    )?;
    Ok(())
}

/// The `Environment=` settings of `deploy/node/credlet-image-guard.service`.
pub fn guard_unit_environment() -> Result<Vec<(String, String)>> {
    let unit =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/node/credlet-image-guard.service");
    let text = fs::read_to_string(&unit).with_context(|| format!("read {}", unit.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// containerd 2 (config version 3), everything below `c`.
pub(crate) fn containerd_config(c: &Path, runc: &Path) -> String {
    let c = c.display();
    let runc = runc.display();
    format!(
        r#"version = 3
root = '{c}/root'
state = '{c}/state'
temp = '{c}/tmp'
imports = []
# Plugins that need host setup this node does not have, or that would use
# host-wide paths (NRI's socket, tracing).
disabled_plugins = [
  'io.containerd.nri.v1.nri',
  'io.containerd.snapshotter.v1.btrfs',
  'io.containerd.snapshotter.v1.devmapper',
  'io.containerd.snapshotter.v1.zfs',
  'io.containerd.snapshotter.v1.erofs',
  'io.containerd.differ.v1.erofs',
  'io.containerd.mount-handler.v1.erofs',
  'io.containerd.tracing.processor.v1.otlp',
  'io.containerd.internal.v1.tracing',
]

[grpc]
  address = '{c}/containerd.sock'

[ttrpc]
  address = '{c}/containerd-ttrpc.sock'

[debug]
  level = 'info'

[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = '{PAUSE_IMAGE}'
    [plugins.'io.containerd.cri.v1.images'.registry]
      config_path = '{c}/certs.d'

  [plugins.'io.containerd.cri.v1.runtime']
    # Lowering oom_score_adj needs CAP_SYS_RESOURCE, which this VM lacks.
    restrict_oom_score_adj = true
    disable_apparmor = true
    enable_cdi = false
    enable_criu = false
    netns_mounts_under_state_dir = true
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = 'io.containerd.runc.v2'
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = '{runc}'
          Root = '{c}/runc'
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ['{c}/cni/bin']
      conf_dir = '{c}/cni/conf'
      # containerd brings `lo` up itself: no loopback plugin needed.
      use_internal_loopback = true

  [plugins.'io.containerd.grpc.v1.cri']
    stream_server_address = '127.0.0.1'
    stream_server_port = '0'

  [plugins.'io.containerd.internal.v1.opt']
    path = '{c}/opt'

  [plugins.'io.containerd.transfer.v1.local']
    config_path = '{c}/certs.d'
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addresses_are_loopback_and_stable() {
        let a = node_ip_for(Path::new("/tmp/a"));
        assert_eq!(a, node_ip_for(Path::new("/tmp/a")));
        assert!(a.is_loopback());
        assert_ne!(a.octets()[3], 0);
        assert_ne!(a.octets()[3], 255);
    }

    #[test]
    fn guard_unit_environment_is_read() {
        let env = guard_unit_environment().unwrap();
        assert!(
            env.iter().any(|(k, _)| k == "CREDLET_CRI_LISTEN"),
            "{env:?}"
        );
        assert!(
            env.iter().all(|(k, _)| k.starts_with("CREDLET_")),
            "{env:?}"
        );
    }
}
