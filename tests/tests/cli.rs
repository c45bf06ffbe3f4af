//! The `credlet` command line: configuration errors, environment variables,
//! log formats, graceful shutdown and the demo.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use credlet_proto::csi::{GetPluginInfoRequest, NodeGetInfoRequest};
use credlet_tests::agent_bin;
use credlet_tests::harness::{CheckTime, TestEnv, Volume, check_volume, mount_at, mounts};

/// Runs a command to completion (at most `timeout`), capturing output.
fn run(mut command: Command, timeout: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("output");
            panic!(
                "still running after {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn invalid_configuration_exits_64_with_a_clear_message() {
    let env = TestEnv::new(agent_bin!());
    let socket = env.socket.to_string_lossy().into_owned();
    let state = env.state_dir.to_string_lossy().into_owned();
    let root = env.root.to_string_lossy().into_owned();
    let missing_root = env
        .base()
        .join("no-such-kubelet")
        .to_string_lossy()
        .into_owned();
    let valid = |overrides: &[(&str, Option<&str>)]| -> Vec<String> {
        let mut flags: Vec<(&str, Option<String>)> = vec![
            ("--csi-endpoint", Some(socket.clone())),
            ("--node-id", Some("node-a".into())),
            ("--state-dir", Some(state.clone())),
            ("--kubelet-root", Some(root.clone())),
            ("--dev-ca", None),
        ];
        for (flag, value) in overrides {
            flags.retain(|(f, _)| f != flag);
            if *value != Some("<remove>") {
                flags.push((flag, value.map(str::to_owned)));
            }
        }
        let mut args = vec!["agent".to_owned()];
        for (flag, value) in flags {
            args.push(flag.to_owned());
            args.extend(value);
        }
        args
    };
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "missing node id",
            valid(&[("--node-id", Some("<remove>"))]),
            "node-id",
        ),
        (
            "missing endpoint",
            valid(&[("--csi-endpoint", Some("<remove>"))]),
            "csi-endpoint",
        ),
        (
            "relative endpoint",
            valid(&[("--csi-endpoint", Some("csi.sock"))]),
            "csi-endpoint",
        ),
        (
            "invalid driver name",
            valid(&[("--driver-name", Some("Not A Driver!"))]),
            "driver-name",
        ),
        (
            "missing kubelet root",
            valid(&[("--kubelet-root", Some(&missing_root))]),
            "kubelet-root",
        ),
        (
            "relative state dir",
            valid(&[("--state-dir", Some("state"))]),
            "state-dir",
        ),
        (
            "invalid trust domain",
            valid(&[("--trust-domain", Some("Bad Domain"))]),
            "trust-domain",
        ),
        (
            "unknown log format",
            valid(&[("--log-format", Some("xml"))]),
            "log-format",
        ),
        (
            "backoff base above cap",
            valid(&[
                ("--backoff-base-ms", Some("5000")),
                ("--backoff-cap-ms", Some("1000")),
            ]),
            "backoff",
        ),
        (
            "non-numeric backoff",
            valid(&[("--backoff-base-ms", Some("soon"))]),
            "backoff-base-ms",
        ),
        ("no CA", valid(&[("--dev-ca", Some("<remove>"))]), "CA"),
        (
            "registration directory missing",
            valid(&[("--registration-dir", Some(missing_root.as_str()))]),
            "registration-dir",
        ),
        (
            "relative registration directory",
            valid(&[("--registration-dir", Some("plugins_registry"))]),
            "registration-dir",
        ),
        (
            "registration path without a registration directory",
            valid(&[(
                "--kubelet-registration-path",
                Some("/var/lib/kubelet/plugins/csi.credlet.io/csi.sock"),
            )]),
            "registration-dir",
        ),
        (
            "unknown flag",
            valid(&[("--frobnicate", None)]),
            "frobnicate",
        ),
    ];
    for (name, args, mention) in cases {
        let mut command = env.command();
        command.args(&args);
        let output = run(command, Duration::from_secs(20));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(64),
            "{name}: {args:?} exited {}; stderr:\n{stderr}",
            output.status
        );
        assert!(
            stderr.contains(mention),
            "{name}: stderr does not mention {mention:?}:\n{stderr}"
        );
        assert!(!env.socket.exists(), "{name}: socket created");
    }
    assert!(
        mounts()
            .iter()
            .all(|m| !m.mount_point.starts_with(env.base()))
    );
}

/// Runs `args` through the binary and asserts exit code 64 with a message on
/// stderr naming `mention`.
fn assert_config_error(env: &TestEnv, name: &str, args: &[String], mention: &str) {
    let mut command = env.command();
    command.args(args);
    let output = run(command, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(64),
        "{name}: {args:?} exited {}; stderr:\n{stderr}",
        output.status
    );
    assert!(
        stderr.contains(mention),
        "{name}: stderr does not mention {mention:?}:\n{stderr}"
    );
}

#[test]
fn invalid_ca_configuration_exits_64_with_a_clear_message() {
    let env = TestEnv::new(agent_bin!());
    let (_, cert, key) = credlet_ca::Authority::generate_self_signed_with_pems(
        credlet_ca::Policy::new("cluster.local"),
    )
    .expect("CA");
    let cert_path = env.base().join("ca.crt");
    let key_path = env.base().join("ca.key");
    std::fs::write(&cert_path, cert).expect("write CA certificate");
    std::fs::write(&key_path, key.as_bytes()).expect("write CA key");
    let missing = env.base().join("no-such-ca.crt");
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let valid = |overrides: &[(&str, Option<&str>)]| -> Vec<String> {
        let mut flags: Vec<(&str, Option<String>)> = vec![
            ("--listen", Some("127.0.0.1:0".into())),
            ("--ca-cert", Some(path(&cert_path))),
            ("--ca-key", Some(path(&key_path))),
            ("--server-name", Some("credlet-ca.credlet.svc".into())),
            (
                "--dns-template",
                Some("$POD_NAME.$POD_NAMESPACE.svc".into()),
            ),
        ];
        for (flag, value) in overrides {
            flags.retain(|(f, _)| f != flag);
            if *value != Some("<remove>") {
                flags.push((flag, value.map(str::to_owned)));
            }
        }
        let mut args = vec!["ca".to_owned()];
        for (flag, value) in flags {
            args.push(flag.to_owned());
            args.extend(value);
        }
        args
    };
    let missing = path(&missing);
    // A valid signer name whose ClusterTrustBundle name would be too long.
    let long_signer = format!("credlet.io/{}", "p".repeat(250));
    let long_identity = "i".repeat(129);
    let cases: Vec<(&str, Vec<String>, &[&str])> = vec![
        (
            "bad listen address",
            valid(&[("--listen", Some("localhost:https"))]),
            &["--listen", "ip:port"],
        ),
        (
            "listen without a port",
            valid(&[("--listen", Some("127.0.0.1"))]),
            &["--listen"],
        ),
        (
            "missing CA certificate file",
            valid(&[("--ca-cert", Some(&missing))]),
            &["--ca-cert", "no-such-ca.crt", "not a readable file"],
        ),
        (
            "CA certificate flag absent",
            valid(&[("--ca-cert", Some("<remove>"))]),
            &["--ca-cert"],
        ),
        (
            "DNS template with a second wildcard",
            valid(&[("--dns-template", Some("$POD_NAME.*.example.com"))]),
            &["--dns-template", "$POD_NAME.*.example.com", "host name"],
        ),
        (
            "DNS template with an unknown variable",
            valid(&[("--dns-template", Some("$NODE_NAME.example.com"))]),
            &["--dns-template", "$NODE_NAME"],
        ),
        (
            "minimum lifetime above the maximum",
            valid(&[
                ("--min-duration", Some("2h")),
                ("--max-duration", Some("1h")),
            ]),
            &["--min-duration", "--max-duration"],
        ),
        (
            "zero minimum lifetime",
            valid(&[("--min-duration", Some("0s"))]),
            &["--min-duration"],
        ),
        (
            "missing server name",
            valid(&[("--server-name", Some("<remove>"))]),
            &["--server-name"],
        ),
        (
            "empty server name",
            valid(&[("--server-name", Some(" "))]),
            &["--server-name", "empty"],
        ),
        (
            "signer name without a path",
            valid(&[("--signer-name", Some("credlet.io"))]),
            &["--signer-name", "<domain>/<path>"],
        ),
        (
            "trust bundle name over the API's limit",
            valid(&[("--signer-name", Some(long_signer.as_str()))]),
            &["--trust-bundle-suffix", "253"],
        ),
        (
            "leader identity too long for Events",
            valid(&[
                ("--signer-name", Some("credlet.io/pods")),
                ("--leader-election-identity", Some(long_identity.as_str())),
            ]),
            &["--leader-election-identity", "128"],
        ),
    ];
    for (name, args, mentions) in cases {
        for mention in mentions {
            assert_config_error(&env, name, &args, mention);
        }
    }
}

#[test]
fn agent_with_dev_ca_and_ca_url_exits_64() {
    let env = TestEnv::new(agent_bin!());
    let trust = env.base().join("ca-trust.pem");
    let (_, cert, _) = credlet_ca::Authority::generate_self_signed_with_pems(
        credlet_ca::Policy::new("cluster.local"),
    )
    .expect("CA");
    std::fs::write(&trust, cert).expect("write trust bundle");
    let args: Vec<String> = [
        "agent",
        "--csi-endpoint",
        &env.socket.to_string_lossy(),
        "--node-id",
        "node-a",
        "--state-dir",
        &env.state_dir.to_string_lossy(),
        "--kubelet-root",
        &env.root.to_string_lossy(),
        "--dev-ca",
        "--ca-url",
        "https://127.0.0.1:8443",
        "--ca-trust",
        &trust.to_string_lossy(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    assert_config_error(
        &env,
        "--dev-ca with --ca-url",
        &args,
        "--dev-ca and --ca-url",
    );
    assert!(!env.socket.exists(), "socket created");
}

#[test]
fn help_and_version_exit_zero() {
    let env = TestEnv::new(agent_bin!());
    for args in [&["--help"][..], &["agent", "--help"], &["--version"]] {
        let mut command = env.command();
        command.args(args);
        let output = run(command, Duration::from_secs(20));
        assert_eq!(output.status.code(), Some(0), "{args:?}");
        assert!(!output.stdout.is_empty(), "{args:?}: no output");
    }
}

#[tokio::test]
async fn environment_variables_configure_the_agent() {
    let mut env = TestEnv::new(agent_bin!());
    let mut command = env.command();
    command
        .arg("agent")
        .env(
            "CREDLET_CSI_ENDPOINT",
            format!("unix://{}", env.socket.display()),
        )
        .env("CREDLET_NODE_ID", "node-from-env")
        .env("CREDLET_STATE_DIR", &env.state_dir)
        .env("CREDLET_KUBELET_ROOT", &env.root)
        .env("CREDLET_DEV_CA", "true")
        .env("CREDLET_DRIVER_NAME", "certs.example.test")
        .env("CREDLET_TRUST_DOMAIN", "example.org");
    env.spawn_command(command);
    let csi = env.wait_ready().await;

    let info = csi
        .identity
        .clone()
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .expect("GetPluginInfo")
        .into_inner();
    assert_eq!(info.name, "certs.example.test");
    let node = csi
        .node
        .clone()
        .node_get_info(NodeGetInfoRequest {})
        .await
        .expect("NodeGetInfo")
        .into_inner();
    assert_eq!(node.node_id, "node-from-env");

    let volume = env.volume("envcfg");
    csi.publish(&volume).await.expect("publish");
    let snapshot =
        check_volume(&volume.target, &volume.files(), CheckTime::Now).expect("consistent");
    assert_eq!(snapshot.leaf.uris, ["spiffe://example.org/ns/shop/sa/web"]);
}

#[tokio::test]
async fn json_log_lines_and_no_secrets_in_logs() {
    let mut env = TestEnv::new(agent_bin!());
    env.extra_args = vec!["--log-format".into(), "json".into()];
    let csi = env.start().await;
    let mut volume = env.volume("jsonlog");
    volume.tokens = Some(
        r#"{"credlet":{"token":"eyJhbGciOi.SECRET-PAYLOAD.sig","expirationTimestamp":"2099-01-01T00:00:00Z"}}"#
            .into(),
    );
    csi.publish(&volume).await.expect("publish");
    let key = check_volume(&volume.target, &volume.files(), CheckTime::Now)
        .expect("consistent")
        .key;
    csi.unpublish_volume(&volume).await.expect("unpublish");
    drop(csi);
    let status = env.stop().await;
    assert!(status.success(), "{status}");

    let log = env.log();
    let mut published = false;
    for line in log.lines().filter(|l| !l.starts_with("==== harness")) {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(value.get("level").is_some(), "no level: {line}");
        assert!(value.get("timestamp").is_some(), "no timestamp: {line}");
        if value.get("message").and_then(|m| m.as_str()) == Some("volume published") {
            assert_eq!(value["volume_id"], volume.id.as_str(), "{line}");
            published = true;
        }
    }
    assert!(published, "no \"volume published\" event in:\n{log}");
    assert!(!log.contains("SECRET-PAYLOAD"), "token in the log");
    let key_body = key.lines().nth(1).expect("key body");
    assert!(!log.contains(key_body), "private key in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_exits_zero_and_keeps_volumes_mounted() {
    let mut env = TestEnv::new(agent_bin!());
    let csi = env.start().await;
    let kept = env.volume("kept").with("credlet.io/duration", "1h");
    csi.publish(&kept).await.expect("publish");
    let serial = check_volume(&kept.target, &kept.files(), CheckTime::Now)
        .expect("consistent")
        .leaf
        .serial_hex;

    // Publishes in flight when SIGTERM arrives either finish completely or
    // leave nothing behind.
    let racing: Vec<Volume> = (0..12).map(|i| env.volume(&format!("race{i}"))).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for volume in racing.clone() {
        let csi = csi.clone();
        tasks.spawn(async move { (volume.id.clone(), csi.publish(&volume).await) });
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    let pid = env.agent().pid();
    credlet_tests::harness::signal(pid, rustix::process::Signal::TERM);
    let mut ok = std::collections::HashSet::new();
    while let Some(result) = tasks.join_next().await {
        let (id, result) = result.expect("task");
        if result.is_ok() {
            ok.insert(id);
        }
    }
    drop(csi);
    let status = env.wait_exit().await;
    assert_eq!(status.code(), Some(0), "exit after SIGTERM: {status}");

    // Volumes outlive the agent: still mounted, same certificate.
    assert!(
        mount_at(&kept.target).is_some(),
        "SIGTERM unmounted a volume"
    );
    let after = check_volume(&kept.target, &kept.files(), CheckTime::Now).expect("consistent");
    assert_eq!(after.leaf.serial_hex, serial);
    for volume in &racing {
        let recorded = env.state_file(&volume.id).exists();
        let mounted = mount_at(&volume.target).is_some();
        if ok.contains(&volume.id) {
            assert!(
                recorded && mounted,
                "{}: acknowledged but not kept",
                volume.id
            );
        }
        if recorded || mounted {
            check_volume(&volume.target, &volume.files(), CheckTime::Now)
                .unwrap_or_else(|e| panic!("{}: half-published: {e:#}", volume.id));
        } else {
            assert!(!volume.target.exists(), "{}: empty target left", volume.id);
        }
    }
    eprintln!(
        "{} of {} publishes racing SIGTERM completed",
        ok.len(),
        racing.len()
    );
}

#[test]
fn demo_runs_and_exits_zero() {
    let env = TestEnv::new(agent_bin!());
    let mut command = env.command();
    command.arg("demo").current_dir(env.base());
    let output = run(command, Duration::from_secs(180));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "demo failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("credlet demo"), "stdout:\n{stdout}");
    let left: Vec<_> = mounts()
        .into_iter()
        .filter(|m| m.mount_point.to_string_lossy().contains("credlet-demo-"))
        .collect();
    assert!(left.is_empty(), "the demo left mounts: {left:?}");
}
