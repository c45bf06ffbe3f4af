//! `cargo xtask`: developer commands.
//!
//! `cargo xtask cluster up` starts a real one-node Kubernetes (etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler, containerd 2,
//! the kubelet; built from their Go modules at the versions in
//! `test-util/k8s/versions.env`) with credlet's image guard in front of
//! containerd and credlet installed from `deploy/overlays/agent-and-ca`,
//! leaves it running and prints `KUBECONFIG=<path>` last.
//! `cargo xtask cluster down` stops it and leaves nothing mounted or
//! running. Both need root.
//!
//! `cargo xtask test` is the README's test command: it installs what the
//! suite drives (Debian packages, and the cluster programs built from their
//! Go modules; nothing when already there) and runs `cargo test
//! --workspace`, so a fresh machine needs nothing else. Root.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use credlet_test_util::cluster::{
    BUSYBOX_IMAGE, CREDLET_IMAGE, CREDLET_NAMESPACE, Cluster, ClusterOptions, CredletOptions,
    import_image, teardown,
};

#[derive(Parser, Debug)]
#[command(name = "cargo xtask", about = "credlet developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand, Debug)]
enum Top {
    /// A real one-node Kubernetes with credlet, on loopback.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Install what the tests need (test-util/install-deps.sh), then run
    /// the whole suite: `cargo test --workspace` with these arguments.
    Test {
        /// Passed to `cargo test --workspace` (e.g. `-- --nocapture`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Build what is missing, start the cluster, install credlet from
    /// deploy/, leave it running; prints KUBECONFIG=<path> last.
    Up {
        /// Where the cluster lives (its logs, kubeconfig, node state).
        #[arg(long, env = "CREDLET_CLUSTER_DIR", default_value_os_t = default_dir())]
        dir: PathBuf,
    },
    /// Import an image (an OCI archive, as `skopeo copy ... oci-archive:`
    /// or `docker save` write) into the node's containerd: pods can then
    /// run it with `imagePullPolicy: Never` or `IfNotPresent`.
    Load {
        /// The archive.
        archive: PathBuf,
        /// The directory `up` used.
        #[arg(long, env = "CREDLET_CLUSTER_DIR", default_value_os_t = default_dir())]
        dir: PathBuf,
    },
    /// Stop the cluster: processes, containers, mounts, cgroups, files.
    Down {
        /// The directory `up` used.
        #[arg(long, env = "CREDLET_CLUSTER_DIR", default_value_os_t = default_dir())]
        dir: PathBuf,
    },
}

fn default_dir() -> PathBuf {
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    state.join("credlet/cluster")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Top::Cluster(ClusterCommand::Up { dir }) => up(&dir),
        Top::Cluster(ClusterCommand::Load { archive, dir }) => load(&dir, &archive),
        Top::Cluster(ClusterCommand::Down { dir }) => down(&dir),
        Top::Test { args } => test(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cargo xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn require_root() -> Result<()> {
    // /proc/self belongs to the process's effective user.
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    if !root {
        bail!("needs root (mounts, cgroups, containers): run it with sudo");
    }
    Ok(())
}

/// The workspace root (this crate lives in `xtask/`).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn up(dir: &Path) -> Result<()> {
    require_root()?;
    eprintln!("cargo xtask: building credlet");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace())
        .args([
            "build",
            "--quiet",
            "--package",
            "credlet",
            "--bin",
            "credlet",
        ])
        .status()
        .context("run cargo build")?;
    if !status.success() {
        bail!("cargo build -p credlet failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let binary = target.join("debug/credlet");
    // The node's copy: the image guard keeps running from it while the
    // workspace is rebuilt.
    std::fs::create_dir_all(dir)?;
    eprintln!(
        "cargo xtask: starting the cluster in {} (the first run builds Kubernetes, etcd and containerd: about 25 min on 2 cores)",
        dir.display()
    );
    let cluster = Cluster::start(ClusterOptions {
        dir: Some(dir.to_path_buf()),
        guard_binary: Some(binary.clone()),
        ..Default::default()
    })?;
    eprintln!("cargo xtask: installing credlet from deploy/overlays/agent-and-ca");
    let installed = cluster.install_credlet(&CredletOptions {
        binary,
        ca_args: Vec::new(),
    });
    let installed = match installed {
        Ok(i) => i,
        Err(e) => {
            eprintln!(
                "cargo xtask: {e:#}\ncargo xtask: the cluster stays up for a look; `cargo xtask cluster down` removes it"
            );
            cluster.detach();
            bail!("credlet did not install");
        }
    };
    cluster.load_busybox()?;
    let kubeconfig = cluster.kubeconfig();
    println!(
        "cluster: Kubernetes {} on node {} (logs in {})",
        cluster.programs().kubernetes_version,
        cluster.node_name(),
        cluster.dir().join("logs").display()
    );
    println!(
        "credlet: namespace {CREDLET_NAMESPACE}, overlay {}",
        installed.applied.display()
    );
    println!(
        "images on the node: {CREDLET_IMAGE}, {BUSYBOX_IMAGE} (add one: cargo xtask cluster load <oci-archive>)"
    );
    println!("kubectl: {}", cluster.programs().kube("kubectl").display());
    cluster.detach();
    println!("KUBECONFIG={}", kubeconfig.display());
    Ok(())
}

fn test(args: &[String]) -> Result<()> {
    require_root()?;
    eprintln!("cargo xtask: installing the tests' components (test-util/install-deps.sh)");
    let status = Command::new("bash")
        .arg(workspace().join("test-util/install-deps.sh"))
        .status()
        .context("run test-util/install-deps.sh")?;
    if !status.success() {
        bail!("test-util/install-deps.sh failed ({status})");
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace())
        .args(["test", "--workspace"])
        .args(args)
        .status()
        .context("run cargo test")?;
    if !status.success() {
        bail!("cargo test --workspace failed ({status})");
    }
    Ok(())
}

fn load(dir: &Path, archive: &Path) -> Result<()> {
    require_root()?;
    import_image(dir, archive)?;
    eprintln!("cargo xtask: imported {}", archive.display());
    Ok(())
}

fn down(dir: &Path) -> Result<()> {
    require_root()?;
    if !dir.exists() {
        eprintln!("cargo xtask: no cluster in {}", dir.display());
        return Ok(());
    }
    teardown(dir)?;
    eprintln!("cargo xtask: cluster in {} removed", dir.display());
    Ok(())
}
