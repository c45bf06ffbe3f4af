//! The real cluster programs, built from their Go modules by
//! `test-util/k8s/build.sh` at the versions pinned in
//! `test-util/k8s/versions.env` and cached by version outside the clone.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::process::run;

/// Where the build script lives, relative to this crate.
fn build_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/build.sh")
}

/// The environment variable that selects another Kubernetes release for one
/// run (`v1.37.2`); the pinned one otherwise.
pub const VERSION_ENV: &str = "CREDLET_K8S_VERSION";

/// Paths of the programs a cluster runs.
#[derive(Debug, Clone)]
pub struct Programs {
    /// The Kubernetes release (`v1.35.4`).
    pub kubernetes_version: String,
    /// kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl.
    pub kubernetes: PathBuf,
    /// etcd.
    pub etcd: PathBuf,
    /// containerd, containerd-shim-runc-v2, ctr.
    pub containerd: PathBuf,
    /// runc (1.2 or later: idmapped mounts for user-namespaced pods).
    pub runc: PathBuf,
}

impl Programs {
    /// Builds what is missing (minutes on a fresh machine, nothing when
    /// cached) and returns the directories.
    pub fn get() -> Result<Self> {
        let script = build_script();
        let out = run(Command::new("bash").arg(&script).args([
            "etcd",
            "containerd",
            "runc",
            "kubernetes",
        ]))
        .with_context(|| format!("build the cluster programs with {}", script.display()))?;
        let dirs: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(PathBuf::from)
            .collect();
        let find = |prefix: &str| -> Result<PathBuf> {
            dirs.iter()
                .find(|d| {
                    d.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(prefix))
                })
                .cloned()
                .with_context(|| format!("{} printed no {prefix}* directory", script.display()))
        };
        let kubernetes = find("kubernetes-")?;
        let kubernetes_version = kubernetes
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("kubernetes-"))
            .unwrap_or_default()
            .to_string();
        let me = Self {
            kubernetes_version,
            kubernetes,
            etcd: find("etcd-")?,
            containerd: find("containerd-")?,
            runc: find("runc-")?.join("runc"),
        };
        for p in [
            me.kube("kube-apiserver"),
            me.kube("kubelet"),
            me.kube("kubectl"),
            me.etcd.join("etcd"),
            me.containerd.join("containerd"),
            me.runc.clone(),
        ] {
            if !p.is_file() {
                bail!("{} is missing after {}", p.display(), script.display());
            }
        }
        Ok(me)
    }

    /// helm v4, built on first use (only the chart's tests need it).
    pub fn helm() -> Result<PathBuf> {
        let script = build_script();
        let out = run(Command::new("bash").arg(&script).arg("helm"))
            .with_context(|| format!("build helm with {}", script.display()))?;
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(PathBuf::from(dir).join("helm"))
    }

    /// A Kubernetes program by name.
    pub fn kube(&self, name: &str) -> PathBuf {
        self.kubernetes.join(name)
    }

    /// The minor version (`35` for `v1.35.4`).
    pub fn minor(&self) -> u32 {
        self.kubernetes_version
            .trim_start_matches("v1.")
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0)
    }
}
