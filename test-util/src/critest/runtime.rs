//! A containerd for critest: containerd 2 (built by `k8s/build.sh`, with
//! its runc) or Debian's containerd 1.6 (with Debian's runc), each with the
//! configuration the harness already uses for it (the test cluster's for
//! 2, [`crate::Containerd`]'s for 1.6), the harness's CNI plugin (pods get
//! a namespace of their own with a 127.64.x.y address, see
//! `k8s/cni-loopback`), the static pause image, and `hosts.toml` mirrors
//! sending critest's registry hosts to a loopback registry.
//!
//! containerd runs in an IPC namespace of its own (`unshare --ipc`), which
//! critest joins ([`CriRuntime::ipc_namespace`]): its host-IPC specs make
//! System V shared memory segments "on the host" and never remove them;
//! here they go with the namespace.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use rustix::process::Signal;

use super::built_programs;
use super::images::MIRRORED_HOSTS;
use crate::containerd::{CRI_NAMESPACE, config_toml as containerd_1_6_config};
use crate::cri::wait_for_cri_image;
use crate::image::{PAUSE_IMAGE, write_pause_archive};
use crate::mirror::write_mirror_hosts;
use crate::process::{Daemon, WorkDir, cleanup_dir, delete_runc_containers_with, run};
use crate::registry::Registry;

/// Which containerd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeKind {
    /// containerd 2 at `k8s/versions.env`'s `CONTAINERD_VERSION`, with runc
    /// at `RUNC_VERSION`.
    Containerd2,
    /// Debian's `containerd` package (1.6) with Debian's `runc`.
    DebianContainerd,
}

/// A running containerd; stopped, its containers deleted and its directory
/// removed on drop.
#[derive(Debug)]
pub struct CriRuntime {
    // Field order matters for drop: daemon, then the directory.
    daemon: Daemon,
    kind: RuntimeKind,
    socket: PathBuf,
    runc: PathBuf,
    version: String,
    dir: WorkDir,
}

impl CriRuntime {
    /// Starts `kind` with every registry host of critest's images mirrored
    /// to `mirror`, and the pause image imported.
    pub fn start(kind: RuntimeKind, mirror: &Registry) -> Result<Self> {
        let (containerd, ctr, runc, path) = match kind {
            RuntimeKind::Containerd2 => {
                let dirs = built_programs(&["containerd", "runc"])?;
                let bin = dirs[0].clone();
                let path = match std::env::var("PATH") {
                    Ok(p) if !p.is_empty() => format!("{}:{p}", bin.display()),
                    _ => format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin.display()),
                };
                (
                    bin.join("containerd"),
                    bin.join("ctr"),
                    dirs[1].join("runc"),
                    Some(path),
                )
            }
            RuntimeKind::DebianContainerd => (
                PathBuf::from("containerd"),
                PathBuf::from("ctr"),
                PathBuf::from("runc"),
                None,
            ),
        };
        let dir = WorkDir::new("critest-containerd")?;
        let d = dir.path();
        for sub in [
            "root", "state", "tmp", "opt", "runc", "certs.d", "cni/bin", "cni/conf",
        ] {
            fs::create_dir_all(d.join(sub))?;
        }
        install_cni(d)?;
        write_mirror_hosts(
            &d.join("certs.d"),
            &MIRRORED_HOSTS,
            &mirror.host(),
            mirror.ca_pem(),
        )?;
        let config = match kind {
            RuntimeKind::Containerd2 => crate::cluster::containerd_config(d, &runc),
            RuntimeKind::DebianContainerd => containerd_1_6_config(d),
        };
        fs::write(d.join("config.toml"), config)?;
        let version = String::from_utf8_lossy(
            &run(Command::new(&containerd).arg("--version"))
                .context("containerd --version")?
                .stdout,
        )
        .trim()
        .to_string();

        let log = d.join("containerd.log");
        let socket = d.join("containerd.sock");
        // unshare(1) execs containerd: the daemon's pid is containerd's.
        let mut cmd = Command::new("unshare");
        cmd.args(["--ipc", "--"])
            .arg(&containerd)
            .arg("--config")
            .arg(d.join("config.toml"));
        if let Some(path) = path {
            // Its shim is found on PATH: the one built with it first.
            cmd.env("PATH", path);
        }
        cmd.env_remove("CONTAINERD_ADDRESS")
            .env_remove("CONTAINERD_NAMESPACE");
        let mut daemon = Daemon::spawn("containerd", cmd, &log, Some(Signal::TERM))?;
        daemon.wait_for_unix(&socket, Duration::from_secs(60))?;

        let archive = d.join("pause.tar");
        write_pause_archive(&d.join("pause-layout"), &archive)?;
        run(Command::new(&ctr)
            .arg("--address")
            .arg(&socket)
            .arg("--namespace")
            .arg(CRI_NAMESPACE)
            .args(["images", "import"])
            .arg(&archive))
        .context("import the pause image")?;
        wait_for_cri_image(&socket, PAUSE_IMAGE, Duration::from_secs(30))?;
        Ok(Self {
            daemon,
            kind,
            socket,
            runc,
            version,
            dir,
        })
    }

    /// Which containerd this is.
    pub fn kind(&self) -> RuntimeKind {
        self.kind
    }

    /// `containerd --version`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The CRI socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `unix://<socket>`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// containerd's IPC namespace (`/proc/<pid>/ns/ipc`), its containers'
    /// "host" IPC namespace.
    pub fn ipc_namespace(&self) -> Result<PathBuf> {
        let pid = self.daemon.pid().context("containerd is not running")?;
        Ok(PathBuf::from(format!("/proc/{pid}/ns/ipc")))
    }

    /// containerd's log.
    pub fn log_path(&self) -> &Path {
        self.daemon.log_path()
    }

    /// The working directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Fails with the log tail if containerd died.
    pub fn check_running(&mut self) -> Result<()> {
        self.daemon.check_running()
    }
}

impl Drop for CriRuntime {
    fn drop(&mut self) {
        self.daemon.stop();
        // Containers critest left (a spec that failed half-way), with the
        // runc that made them; then shims and mounts.
        delete_runc_containers_with(&self.runc, &self.dir.path().join("runc"));
        cleanup_dir(self.dir.path(), false);
    }
}

/// The harness's pod network plugin (`credlet-loopback`) and its
/// configuration, plus the `loopback` plugin containerd 1.6 insists on.
fn install_cni(d: &Path) -> Result<()> {
    for (name, script) in [
        ("credlet-loopback", include_str!("../../k8s/cni-loopback")),
        ("loopback", include_str!("../../k8s/cni-lo")),
    ] {
        let path = d.join("cni/bin").join(name);
        fs::write(&path, script)?;
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    fs::write(
        d.join("cni/conf/10-credlet-loopback.conflist"),
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "credlet-loopback",
            "plugins": [{"type": "credlet-loopback"}],
        })
        .to_string(),
    )?;
    Ok(())
}
