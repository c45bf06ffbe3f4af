//! `credlet demo`: the whole pod-certificate path in one process, no
//! cluster. An embedded CA, the agent's CSI server on a temporary socket,
//! and a simulated kubelet that publishes a volume for a demo pod, watches
//! it rotate, and unpublishes it.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail, ensure};
use credlet_ca::{Authority, Policy};
use credlet_csi::{EmbeddedIssuer, attributes as attr};
use credlet_proto::csi::identity_client::IdentityClient;
use credlet_proto::csi::node_client::NodeClient;
use credlet_proto::csi::volume_capability::{AccessMode, AccessType, MountVolume, access_mode};
use credlet_proto::csi::{
    GetPluginInfoRequest, NodeGetInfoRequest, NodePublishVolumeRequest, NodeUnpublishVolumeRequest,
    ProbeRequest, VolumeCapability,
};
use tonic::transport::Channel;

use crate::agent::Agent;
use crate::config::{AgentConfig, DemoConfig};

const POD_NAME: &str = "checkout-7f9c5";
const POD_NAMESPACE: &str = "shop";
const SERVICE_ACCOUNT: &str = "checkout";
const VOLUME_NAME: &str = "mtls";

/// Prints a line for the person running the demo. Into a pipe whose
/// reader has quit (`credlet demo | head`) nothing more is printed, and the
/// demo still runs to its end, which unmounts and removes what it made.
macro_rules! say {
    () => {
        say_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        say_line(format_args!($($arg)*))
    };
}

fn say_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    static CLOSED: AtomicBool = AtomicBool::new(false);
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        CLOSED.store(true, Ordering::Relaxed);
    }
}

/// Runs the demo.
pub async fn run(args: DemoConfig) -> anyhow::Result<()> {
    let started = Instant::now();
    let temp;
    let base: PathBuf = match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            dir.canonicalize()?
        }
        None => {
            temp = tempfile::Builder::new().prefix("credlet-demo-").tempdir()?;
            temp.path().canonicalize()?
        }
    };
    let is_root = rustix::process::geteuid().is_root();

    say!("credlet demo: a pod certificate issued, rotated in place and removed, with no cluster");
    say!();
    say!("  folder        {}", base.display());
    if is_root {
        say!("  volume        a size-limited tmpfs (nodev,nosuid,noexec), as on a node");
    } else {
        say!("  volume        a plain directory: not running as root, so no tmpfs mount");
        say!("                (on a node the agent runs as root and keys live only on tmpfs)");
    }

    let kubelet_root = base.join("kubelet");
    let pod_uid = demo_uid();
    let target_parent = kubelet_root
        .join("pods")
        .join(&pod_uid)
        .join("volumes/kubernetes.io~csi")
        .join(VOLUME_NAME);
    std::fs::create_dir_all(&target_parent)?;
    let target = target_parent.join("mount");
    let csi_socket = base.join("csi.sock");
    let config = AgentConfig {
        csi_socket: Some(csi_socket.clone()),
        registration: None,
        health_listen: None,
        per_volume_metrics: false,
        image_guard: None,
        node_id: "demo-node".into(),
        state_dir: base.join("state"),
        kubelet_root: kubelet_root.canonicalize()?,
        driver_name: credlet_csi::server::DEFAULT_DRIVER_NAME.into(),
        trust_domain: "cluster.local".into(),
        token_audience: "credlet-ca".into(),
        plain_directories: !is_root,
        tmpfs_size_bytes: 1 << 20,
        backoff_base: Duration::from_millis(200),
        backoff_cap: Duration::from_secs(2),
        max_concurrent_renewals: 4,
        dev_ca_min_duration: Duration::from_secs(1),
        remote_ca: None,
    };

    let mut policy = Policy::new(config.trust_domain.clone());
    policy.min_duration = config.dev_ca_min_duration;
    let authority = Authority::generate_self_signed(policy)?;
    let issuer = Arc::new(EmbeddedIssuer::trusting_claimed_identity(authority));
    let agent = Agent::start(&config, issuer).await?;
    let listener = credlet_csi::server::bind_unix_socket(&csi_socket)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(credlet_csi::server::serve(
        listener,
        credlet_csi::server::IdentityService::new(
            config.driver_name.clone(),
            Arc::clone(&agent.manager),
        ),
        credlet_csi::server::NodeService::new(config.node_id.clone(), Arc::clone(&agent.manager)),
        async {
            let _ = stop_rx.await;
        },
    ));
    say!("  CSI socket    {}", csi_socket.display());
    say!("  CA            embedded development CA (trust domain cluster.local)");
    say!();

    let channel = crate::client::unix_channel(&csi_socket).await?;
    let result = kubelet(channel, &target, &pod_uid, &args, started).await;

    let _ = stop_tx.send(());
    let _ = server.await;
    agent.stop().await;
    result?;
    say!();
    say!(
        "done in {:.1} s. Next: `credlet agent --help`, docs/ARCHITECTURE.md",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The simulated kubelet: the calls a real kubelet makes for an inline CSI
/// volume of a starting pod, then for its removal.
async fn kubelet(
    channel: Channel,
    target: &Path,
    pod_uid: &str,
    args: &DemoConfig,
    started: Instant,
) -> anyhow::Result<()> {
    let mut identity = IdentityClient::new(channel.clone());
    let mut node = NodeClient::new(channel);
    let info = identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await?
        .into_inner();
    let mut ready = false;
    for _ in 0..100 {
        if identity.probe(ProbeRequest {}).await?.into_inner().ready == Some(true) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(ready, "the plugin did not become ready");
    let node_info = node
        .node_get_info(NodeGetInfoRequest {})
        .await?
        .into_inner();
    say!(
        "kubelet: plugin {} {} is ready on node {}",
        info.name,
        info.vendor_version,
        node_info.node_id
    );

    let lifetime_s = args.lifetime.as_secs();
    let request = publish_request(target, pod_uid, lifetime_s);
    say!("kubelet: NodePublishVolume for pod {POD_NAMESPACE}/{POD_NAME} (volume {VOLUME_NAME:?})");
    let t = Instant::now();
    node.node_publish_volume(request.clone()).await?;
    say!(
        "         published in {:.2} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    say!();
    let first = read_volume(target)?;
    print_certificate(&first)?;
    print_files(target)?;

    let t = Instant::now();
    node.node_publish_volume(request.clone()).await?;
    let again = read_volume(target)?;
    ensure!(
        again.serial == first.serial,
        "republish re-issued a valid certificate"
    );
    say!(
        "kubelet: republish (requiresRepublish) answered in {:.2} ms; same certificate, nothing re-issued",
        t.elapsed().as_secs_f64() * 1e3
    );
    say!();

    say!(
        "waiting for {} rotations (lifetime {} s, renewal at 50-70 % of it)...",
        args.rotations,
        lifetime_s
    );
    let mut current = first;
    for n in 1..=args.rotations {
        let deadline = Instant::now() + Duration::from_secs(lifetime_s * 2 + 5);
        let next = loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            // A reader between two rotations always sees a matching pair.
            let v = read_volume(target)?;
            if v.serial != current.serial {
                break v;
            }
            if Instant::now() > deadline {
                bail!("no rotation within {} s", lifetime_s * 2 + 5);
            }
        };
        ensure!(next.key_pem != current.key_pem, "rotation reused the key");
        say!(
            "  rotation {n} at +{:>4.1} s: serial {}  new key: yes  key matches certificate: yes  chains to ca.crt: yes",
            started.elapsed().as_secs_f64(),
            short(&next.serial)
        );
        current = next;
    }
    say!();

    say!("kubelet: NodeUnpublishVolume (pod deleted)");
    node.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: request.volume_id.clone(),
        target_path: request.target_path.clone(),
    })
    .await?;
    ensure!(!target.exists(), "target path still exists after unpublish");
    say!("         volume unmounted and removed; its state record is gone");
    Ok(())
}

fn publish_request(target: &Path, pod_uid: &str, lifetime_s: u64) -> NodePublishVolumeRequest {
    let context: HashMap<String, String> = [
        (attr::POD_NAME, POD_NAME.to_owned()),
        (attr::POD_NAMESPACE, POD_NAMESPACE.to_owned()),
        (attr::POD_UID, pod_uid.to_owned()),
        (attr::SERVICE_ACCOUNT_NAME, SERVICE_ACCOUNT.to_owned()),
        ("csi.storage.k8s.io/ephemeral", "true".to_owned()),
        (
            attr::DNS_NAMES,
            "$POD_NAME.$POD_NAMESPACE.svc,checkout.shop.svc".to_owned(),
        ),
        (attr::DURATION, format!("{lifetime_s}s")),
        (
            attr::CREDENTIAL_BUNDLE_FILE,
            "credential-bundle.pem".to_owned(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    NodePublishVolumeRequest {
        volume_id: format!("csi-demo-{pod_uid}"),
        target_path: target.display().to_string(),
        volume_capability: Some(VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume::default())),
            access_mode: Some(AccessMode {
                mode: access_mode::Mode::SingleNodeWriter as i32,
            }),
        }),
        readonly: true,
        volume_context: context,
        ..NodePublishVolumeRequest::default()
    }
}

struct VolumeView {
    key_pem: String,
    chain_pem: String,
    serial: String,
}

/// Reads key, chain and bundle through the visible names, as a pod does,
/// and checks they belong together.
fn read_volume(target: &Path) -> anyhow::Result<VolumeView> {
    let key_pem = std::fs::read_to_string(target.join("tls.key"))?;
    let chain_pem = std::fs::read_to_string(target.join("tls.crt"))?;
    let bundle = std::fs::read_to_string(target.join("ca.crt"))?;
    ensure!(
        credlet_ca::key_matches_certificate(&key_pem, &chain_pem)?,
        "tls.key does not match tls.crt"
    );
    credlet_ca::verify_chain(&chain_pem, &bundle, SystemTime::now())
        .context("tls.crt does not chain to ca.crt")?;
    let serial = credlet_ca::inspect_leaf(&chain_pem)?.serial_hex;
    Ok(VolumeView {
        key_pem,
        chain_pem,
        serial,
    })
}

fn print_certificate(view: &VolumeView) -> anyhow::Result<()> {
    let leaf = credlet_ca::inspect_leaf(&view.chain_pem)?;
    let fmt_time = |t: SystemTime| {
        let t = time::OffsetDateTime::from(t);
        format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        )
    };
    say!("certificate");
    say!(
        "  subject       {}",
        if leaf.subject.is_empty() {
            "(empty; identity is in the SANs)"
        } else {
            &leaf.subject
        }
    );
    for uri in &leaf.uris {
        say!("  URI SAN       {uri}");
    }
    for dns in &leaf.dns_names {
        say!("  DNS SAN       {dns}");
    }
    say!("  serial        {}", short(&leaf.serial_hex));
    say!("  not before    {}", fmt_time(leaf.not_before));
    say!("  not after     {}", fmt_time(leaf.not_after));
    say!("  key           ECDSA P-256, generated on the node; only a CSR left the agent");
    say!("  checks        key matches certificate, chain verifies against ca.crt");
    say!();
    Ok(())
}

fn print_files(target: &Path) -> anyhow::Result<()> {
    say!("files in {}", target.display());
    let mut entries: Vec<_> = std::fs::read_dir(target)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let meta = std::fs::symlink_metadata(entry.path())?;
        if meta.file_type().is_symlink() {
            let link = std::fs::read_link(entry.path())?;
            let real = std::fs::metadata(entry.path())?;
            if real.is_file() {
                let mode = real.permissions().mode() & 0o777;
                say!(
                    "  {name:<24} -> {:<24} mode {mode:o}  {:>5} bytes",
                    link.display(),
                    real.size()
                );
            } else {
                say!("  {name:<24} -> {}", link.display());
            }
        } else {
            say!("  {name:<24}    (payload directory of the current version)");
        }
    }
    say!("  (visible names point through ..data, which is swapped atomically on rotation)");
    say!();
    Ok(())
}

fn short(serial: &str) -> String {
    if serial.len() > 16 {
        format!("{}…", &serial[..16])
    } else {
        serial.to_owned()
    }
}

fn demo_uid() -> String {
    let n = fastrand::u128(..);
    let h = format!("{n:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
