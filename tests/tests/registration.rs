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

/// The kubelet's plugin watcher dials the registration socket by its bare
/// path, so grpc-go sends the percent-encoded path as `:authority`, which
/// h2 refuses on its own (RST_STREAM PROTOCOL_ERROR): the driver would
/// never register on a real node. The CSI socket gets the same from other
/// clients.
#[tokio::test]
async fn calls_with_the_socket_path_as_authority_are_answered() {
    use prost::Message;
    let mut env = TestEnv::new(agent_bin!());
    let registry = env.base().join("kubelet/plugins_registry");
    std::fs::create_dir_all(&registry).expect("create plugins_registry");
    env.extra_args
        .extend(["--registration-dir".into(), registry.display().to_string()]);
    let _csi = env.start().await;
    let socket = registry.join(format!("{DRIVER}-reg.sock"));
    wait_until("the registration socket", Duration::from_secs(10), || {
        anyhow::ensure!(socket.exists());
        Ok(())
    })
    .await;
    let authority = |p: &Path| p.display().to_string().replace('/', "%2F");

    let (status, message) = credlet_test_util::raw_unary_call(
        &socket,
        &authority(&socket),
        "/pluginregistration.Registration/GetInfo",
        &[],
    )
    .await
    .expect("GetInfo with the kubelet's :authority");
    assert_eq!(status, "0");
    let info = credlet_proto::pluginregistration::PluginInfo::decode(message.as_slice())
        .expect("PluginInfo");
    assert_eq!(info.name, DRIVER);

    let csi = env.base().join("plugins/csi.credlet.io/csi.sock");
    let (status, message) = credlet_test_util::raw_unary_call(
        &csi,
        &authority(&csi),
        "/csi.v1.Identity/GetPluginInfo",
        &[],
    )
    .await
    .expect("GetPluginInfo with a path :authority");
    assert_eq!(status, "0");
    let plugin = credlet_proto::csi::GetPluginInfoResponse::decode(message.as_slice())
        .expect("GetPluginInfoResponse");
    assert_eq!(plugin.name, DRIVER);
}

fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).expect("stat socket").ino()
}

/// A registration socket nobody listens on any more is replaced at start;
/// one a live agent serves is not: the second agent exits 64 naming
/// --registration-dir, stops the CSI server it had started (removing that
/// socket), and the first one still registers with the kubelet.
#[tokio::test]
async fn a_stale_registration_socket_is_replaced_and_a_live_one_is_not_taken() {
    let mut env = TestEnv::new(agent_bin!());
    let registry = env.base().join("kubelet/plugins_registry");
    std::fs::create_dir_all(&registry).expect("create plugins_registry");
    let socket = registry.join(format!("{DRIVER}-reg.sock"));
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
    assert!(std::os::unix::net::UnixStream::connect(&socket).is_err());
    env.extra_args
        .extend(["--registration-dir".into(), registry.display().to_string()]);
    let _csi = env.start().await;
    let registered = async {
        // The socket is bound right after the CSI socket.
        for _ in 0..100 {
            if register(&socket, &env, Ok(())).await.is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    };
    assert!(registered.await, "registration on the replaced socket");
    let live = inode(&socket);

    // Another agent (its own CSI socket and state) on the same registry.
    let second = TestEnv::new(agent_bin!());
    let mut command = second.command();
    command
        .args(second.agent_args())
        .args(["--registration-dir", &registry.display().to_string()])
        .args(["--log-level", "error"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::from(command).output(),
    )
    .await
    .expect("the second agent exits")
    .expect("run the second agent");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "credlet: --registration-dir (CREDLET_REGISTRATION_DIR): {} is served by another running process; stop it first or choose another path\n",
            socket.display()
        )
    );
    assert!(
        !second.socket.exists(),
        "the second agent left its CSI socket"
    );
    assert_eq!(inode(&socket), live, "the registration socket was replaced");
    register(&socket, &env, Ok(()))
        .await
        .expect("the first agent still registers");
}

/// The registration socket replaced under the agent by another live
/// process's (a newer agent): the agent does not take it back, and leaves
/// it at exit.
#[tokio::test]
async fn an_exiting_agent_leaves_a_newer_registration_socket() {
    let mut env = TestEnv::new(agent_bin!());
    let registry = env.base().join("kubelet/plugins_registry");
    std::fs::create_dir_all(&registry).expect("create plugins_registry");
    env.extra_args
        .extend(["--registration-dir".into(), registry.display().to_string()]);
    let _csi = env.start().await;
    let socket = registry.join(format!("{DRIVER}-reg.sock"));
    wait_until("the registration socket", Duration::from_secs(10), || {
        anyhow::ensure!(socket.exists(), "no socket yet");
        Ok(())
    })
    .await;

    std::fs::remove_file(&socket).expect("remove the socket");
    let newer = std::os::unix::net::UnixListener::bind(&socket).expect("bind the newer socket");
    let newer_inode = inode(&socket);
    wait_until("the agent noticing", Duration::from_secs(10), || {
        anyhow::ensure!(
            env.log()
                .contains("another process serves the registration socket now; not taking it")
        );
        Ok(())
    })
    .await;
    // Another check interval or two: still not taken.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(inode(&socket), newer_inode, "the agent took the socket");

    let status = env.stop().await;
    assert!(status.success(), "agent exit: {status:?}");
    assert_eq!(
        inode(&socket),
        newer_inode,
        "the agent removed the newer socket"
    );
    // The path still leads to the newer listener: a connection arrives there.
    let _client =
        std::os::unix::net::UnixStream::connect(&socket).expect("the newer socket still answers");
    newer.set_nonblocking(true).expect("nonblocking");
    newer
        .accept()
        .expect("the connection reached the newer listener");
}
