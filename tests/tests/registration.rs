//! Built-in kubelet plugin registration, with the test playing the kubelet's
//! plugin watcher against the real `credlet agent` process: discovery of the
//! socket in `plugins_registry`, GetInfo, the CSI endpoint it names,
//! NotifyRegistrationStatus, a kubelet restart, the socket being removed
//! under the agent, and the socket's removal on SIGTERM.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use credlet_proto::csi::GetPluginInfoRequest;
use credlet_proto::pluginregistration::registration_client::RegistrationClient;
use credlet_proto::pluginregistration::{InfoRequest, RegistrationStatus};
use credlet_tests::agent_bin;
use credlet_tests::harness::{Csi, TestEnv, unix_channel, wait_until};
use tonic::transport::Channel;

const DRIVER: &str = "csi.credlet.io";

async fn connect(path: &Path) -> Result<RegistrationClient<Channel>> {
    let channel = unix_channel(path)
        .await
        .context("connect to the registration socket")?;
    Ok(RegistrationClient::new(channel))
}

/// What the kubelet's plugin watcher does at start: list the registry
/// directory and take every socket whose name does not start with '.'.
fn discover(registry: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(registry)
        .expect("read plugins_registry")
        .filter_map(|entry| entry.ok())
        .filter(|entry| {
            !entry.file_name().to_string_lossy().starts_with('.')
                && entry.file_type().is_ok_and(|t| t.is_socket())
        })
        .map(|entry| entry.path())
        .collect();
    found.sort();
    found
}

/// One registration round as the kubelet runs it: GetInfo, a call to the
/// CSI endpoint it names, then the verdict.
async fn register(socket: &Path, env: &TestEnv, verdict: Result<(), &str>) -> Result<()> {
    let mut client = connect(socket).await?;
    let info = client.get_info(InfoRequest {}).await?.into_inner();
    assert_eq!(info.r#type, "CSIPlugin");
    assert_eq!(info.name, DRIVER);
    assert!(
        info.supported_versions.iter().any(|v| v.starts_with("1.")),
        "a CSI 1.x version is offered: {:?}",
        info.supported_versions
    );
    let endpoint = PathBuf::from(&info.endpoint);
    assert_eq!(endpoint, env.base().join("plugins/csi.credlet.io/csi.sock"));
    // The kubelet's CSI plugin handler checks the driver behind the
    // endpoint before it registers it.
    let csi = Csi::connect(&endpoint).await?;
    let plugin = csi
        .identity
        .clone()
        .get_plugin_info(GetPluginInfoRequest {})
        .await?
        .into_inner();
    assert_eq!(
        plugin.name, info.name,
        "the endpoint serves the driver named"
    );
    client
        .notify_registration_status(match verdict {
            Ok(()) => RegistrationStatus {
                plugin_registered: true,
                error: String::new(),
            },
            Err(error) => RegistrationStatus {
                plugin_registered: false,
                error: error.to_owned(),
            },
        })
        .await?;
    Ok(())
}

#[tokio::test]
async fn the_agent_registers_its_driver_with_the_kubelet() {
    let mut env = TestEnv::new(agent_bin!());
    let registry = env.base().join("kubelet/plugins_registry");
    std::fs::create_dir_all(&registry).expect("create plugins_registry");
    env.extra_args
        .extend(["--registration-dir".into(), registry.display().to_string()]);
    let _csi = env.start().await;

    // Discovery: exactly one socket, named after the driver.
    let sockets = wait_until("the registration socket", Duration::from_secs(10), || {
        let found = discover(&registry);
        anyhow::ensure!(!found.is_empty(), "no socket yet");
        Ok(found)
    })
    .await;
    let socket = registry.join(format!("{DRIVER}-reg.sock"));
    assert_eq!(sockets, vec![socket.clone()]);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&socket).expect("stat").permissions(),
    );
    assert_eq!(mode & 0o077, 0, "only root may talk to the socket");

    register(&socket, &env, Ok(())).await.expect("register");
    wait_until("the registration logged", Duration::from_secs(5), || {
        anyhow::ensure!(env.log().contains("the kubelet registered the CSI driver"));
        Ok(())
    })
    .await;

    // A kubelet restart finds the same socket and registers again; a
    // refusal is reported with the kubelet's reason.
    register(&socket, &env, Err("driver csi.credlet.io: version too old"))
        .await
        .expect("second round");
    wait_until("the refusal logged", Duration::from_secs(5), || {
        let log = env.log();
        anyhow::ensure!(log.contains("the kubelet refused to register the CSI driver"));
        anyhow::ensure!(log.contains("version too old"));
        Ok(())
    })
    .await;
    register(&socket, &env, Ok(())).await.expect("third round");

    // The socket removed under the agent (a cleaned registry directory):
    // it is bound again, and the kubelet can register the driver again.
    std::fs::remove_file(&socket).expect("remove the socket");
    wait_until("the socket bound again", Duration::from_secs(10), || {
        let meta = std::fs::symlink_metadata(&socket)?;
        anyhow::ensure!(meta.file_type().is_socket());
        Ok(())
    })
    .await;
    let rebound = async {
        // The new listener may appear a moment before it accepts.
        for _ in 0..50 {
            if register(&socket, &env, Ok(())).await.is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    };
    assert!(rebound.await, "registration works on the new socket");
    assert!(env.log().contains("binding it again"));

    // SIGTERM: the socket is removed, which unregisters the driver.
    let status = env.stop().await;
    assert!(status.success(), "agent exit: {status:?}");
    assert!(
        !socket.exists(),
        "the registration socket is removed on shutdown"
    );
    assert!(discover(&registry).is_empty());
}
