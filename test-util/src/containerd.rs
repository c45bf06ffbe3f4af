//! A private containerd (Debian's 1.6) with the CRI plugin, runc, our own
//! pause image and a hosts.toml per test registry.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result};
use rustix::process::Signal;

use crate::cri::wait_for_cri_image;
use crate::image::{PAUSE_IMAGE, write_pause_archive};
use crate::process::{Daemon, WorkDir, cleanup_dir, run};
use crate::registry::Registry;

/// The containerd namespace the CRI plugin uses.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// A running containerd. On drop: containerd is stopped, then every
/// container (runc state below its dir), shim and mount is removed.
#[derive(Debug)]
pub struct Containerd {
    // Field order matters for drop: daemon, then the directory sweep.
    daemon: Daemon,
    config: PathBuf,
    socket: PathBuf,
    certs_d: PathBuf,
    log: PathBuf,
    pause_image_id: String,
    dir: WorkDir,
}

impl Containerd {
    /// Starts containerd and imports the pause image; no registry trusted yet.
    pub fn start() -> Result<Self> {
        Self::start_with(&[])
    }

    /// Starts containerd trusting the CAs of `registries` (hosts.toml).
    pub fn start_with(registries: &[&Registry]) -> Result<Self> {
        let dir = WorkDir::new("containerd")?;
        let d = dir.path();
        for sub in [
            "root", "state", "tmp", "opt", "runc", "certs.d", "cni/bin", "cni/conf",
        ] {
            fs::create_dir_all(d.join(sub))?;
        }
        let socket = d.join("containerd.sock");
        let config = d.join("config.toml");
        fs::write(&config, config_toml(d))?;
        let log = d.join("containerd.log");
        let certs_d = d.join("certs.d");
        let mut daemon = spawn_containerd(&config, &log)?;
        daemon.wait_for_unix(&socket, Duration::from_secs(30))?;

        let layout = d.join("pause-layout");
        let archive = d.join("pause.tar");
        write_pause_archive(&layout, &archive)?;
        let mut me = Self {
            daemon,
            config,
            socket,
            certs_d,
            log,
            pause_image_id: String::new(),
            dir,
        };
        me.ctr(&["images", "import", &archive.to_string_lossy()])
            .context("import the pause image")?;
        me.pause_image_id = wait_for_cri_image(&me.socket, PAUSE_IMAGE, Duration::from_secs(30))?;
        for r in registries {
            me.trust_registry(r)?;
        }
        Ok(me)
    }

    /// Writes `certs.d/<host>/hosts.toml` naming `registry`'s CA. containerd
    /// reads these files on every pull, so this works after start too.
    pub fn trust_registry(&self, registry: &Registry) -> Result<()> {
        self.trust_host(&registry.host(), registry.ca_pem())
    }

    /// Writes `certs.d/<host>/hosts.toml` for `host` (`host:port`, e.g. a
    /// relay in front of a registry) trusting `ca_pem`.
    pub fn trust_host(&self, host: &str, ca_pem: &str) -> Result<()> {
        let dir = self.certs_d.join(host);
        fs::create_dir_all(&dir)?;
        let ca = dir.join("ca.crt");
        fs::write(&ca, ca_pem)?;
        let toml = format!(
            "server = \"https://{host}\"\n\n[host.\"https://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"{}\"\n",
            ca.display()
        );
        fs::write(dir.join("hosts.toml"), toml)?;
        Ok(())
    }

    /// The CRI (and containerd API) gRPC socket.
    pub fn cri_socket(&self) -> &Path {
        &self.socket
    }

    /// `unix://<socket>`, the form kubelet's `containerRuntimeEndpoint` takes.
    pub fn cri_endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The sandbox image name (imported, never pulled).
    pub fn pause_image(&self) -> &'static str {
        PAUSE_IMAGE
    }

    /// CRI image id (config digest) of the pause image.
    pub fn pause_image_id(&self) -> &str {
        &self.pause_image_id
    }

    /// The working directory (root, state, runc root, certs.d, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The containerd log.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Runs `ctr --address <socket> --namespace k8s.io <args>`.
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        run(Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(CRI_NAMESPACE)
            .args(args))
    }

    /// Stops containerd (SIGTERM); running containers and their shims stay,
    /// as on a real node. Calls fail until [`Containerd::restart`].
    pub fn stop(&mut self) {
        self.daemon.stop();
    }

    /// Starts containerd again with the same root and state.
    pub fn restart(&mut self) -> Result<()> {
        self.daemon.stop();
        let mut daemon = spawn_containerd(&self.config, &self.log)?;
        daemon.wait_for_unix(&self.socket, Duration::from_secs(30))?;
        self.daemon = daemon;
        Ok(())
    }

    /// Fails with the log tail if containerd died.
    pub fn check_running(&mut self) -> Result<()> {
        self.daemon.check_running()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.daemon.stop();
        // Containers, shims and mounts; the WorkDir drop then removes the dir.
        cleanup_dir(self.dir.path(), false);
    }
}

fn spawn_containerd(config: &Path, log: &Path) -> Result<Daemon> {
    let mut cmd = Command::new("containerd");
    cmd.arg("--config").arg(config);
    // Never let an inherited CONTAINERD_ADDRESS etc. point ctr/shims elsewhere.
    cmd.env_remove("CONTAINERD_ADDRESS")
        .env_remove("CONTAINERD_NAMESPACE");
    Daemon::spawn("containerd", cmd, log, Some(Signal::TERM))
}

/// containerd 1.6 config (version 2) with everything private below `d`.
pub(crate) fn config_toml(d: &Path) -> String {
    let d = d.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
temp = "{d}/tmp"
oom_score = 0
# Snapshotters that cannot work on this filesystem only log errors.
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd-ttrpc.sock"

[debug]
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # Lowering oom_score_adj needs CAP_SYS_RESOURCE, which this VM lacks.
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  # Random port: several containerds may run at once.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/conf"

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        # runc state (per namespace below this) stays private too.
        Root = "{d}/runc"
        SystemdCgroup = false

  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{d}/certs.d"
"#
    )
}
