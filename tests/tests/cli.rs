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

/// What a configuration error must print on stderr: exactly this line, or
/// one line starting with the first part and holding the others (where the
/// rest is a message of the OS or a library).
#[derive(Debug)]
enum Line {
    Is(String),
    Has(Vec<String>),
}

fn is(line: impl Into<String>) -> Line {
    Line::Is(line.into())
}

fn has(parts: &[&str]) -> Line {
    Line::Has(parts.iter().map(|p| (*p).to_owned()).collect())
}

/// One bad configuration: its name, the arguments, environment variables
/// to set (`None`: to remove) and the line it must print.
type Case = (
    &'static str,
    Vec<String>,
    Vec<(&'static str, Option<String>)>,
    Line,
);

/// Runs `command` and checks exit code 64 with exactly one line on stderr
/// (no log lines, no error chain, nothing on stdout).
fn assert_one_line_config_error(name: &str, command: Command, expected: &Line) {
    let output = run(command, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(64),
        "{name}: exited {}; stderr:\n{stderr}",
        output.status
    );
    assert!(output.stdout.is_empty(), "{name}: stdout not empty");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{name}: not one line:\n{stderr}");
    match expected {
        Line::Is(line) => assert_eq!(lines[0], line, "{name}"),
        Line::Has(parts) => {
            assert!(lines[0].starts_with(&parts[0]), "{name}: {}", lines[0]);
            for part in &parts[1..] {
                assert!(
                    lines[0].contains(part.as_str()),
                    "{name}: {part:?} missing in {}",
                    lines[0]
                );
            }
        }
    }
}

fn run_cases(env: &TestEnv, cases: Vec<Case>) {
    for (name, args, vars, expected) in cases {
        let mut command = env.command();
        command.args(&args);
        for (key, value) in vars {
            match value {
                Some(value) => command.env(key, value),
                None => command.env_remove(key),
            };
        }
        assert_one_line_config_error(name, command, &expected);
        assert!(!env.socket.exists(), "{name}: socket created");
    }
}

/// `agent` with `overrides` applied to a valid development configuration.
fn agent_args(env: &TestEnv, overrides: &[(&str, Option<&str>)]) -> Vec<String> {
    let path = |p: &std::path::Path| Some(p.to_string_lossy().into_owned());
    let flags = vec![
        ("--csi-endpoint", path(&env.socket)),
        ("--node-id", Some("node-a".to_owned())),
        ("--state-dir", path(&env.state_dir)),
        ("--kubelet-root", path(&env.root)),
        ("--dev-ca", None),
    ];
    with_overrides("agent", flags, overrides)
}

/// `mode` and `flags`, each flag in `overrides` replaced (`<remove>`:
/// dropped) or added.
fn with_overrides(
    mode: &str,
    flags: Vec<(&str, Option<String>)>,
    overrides: &[(&str, Option<&str>)],
) -> Vec<String> {
    let mut flags: Vec<(String, Option<String>)> =
        flags.into_iter().map(|(f, v)| (f.to_owned(), v)).collect();
    for (flag, value) in overrides {
        flags.retain(|(f, _)| f != flag);
        if *value != Some("<remove>") {
            flags.push(((*flag).to_owned(), value.map(str::to_owned)));
        }
    }
    let mut args = vec![mode.to_owned()];
    for (flag, value) in flags {
        args.push(flag);
        args.extend(value);
    }
    args
}

/// A kubeconfig that loads but whose server nobody answers: `credlet ca`
/// gets past it to the checks behind it.
fn unreachable_kubeconfig(env: &TestEnv) -> String {
    let path = env.base().join("unreachable.kubeconfig");
    std::fs::write(
        &path,
        credlet_tests::cluster::kubeconfig_yaml("http://127.0.0.1:1"),
    )
    .expect("write kubeconfig");
    path.to_string_lossy().into_owned()
}

#[test]
fn agent_configuration_errors_exit_64_with_one_line_naming_flag_and_variable() {
    let env = TestEnv::new(agent_bin!());
    let missing = env.base().join("no-such-dir");
    let missing = missing.to_string_lossy().into_owned();
    let trust = env.base().join("ca-trust.pem");
    let (_, cert, _) = credlet_ca::Authority::generate_self_signed_with_pems(
        credlet_ca::Policy::new("cluster.local"),
    )
    .expect("CA");
    std::fs::write(&trust, cert).expect("write trust bundle");
    let trust = trust.to_string_lossy().into_owned();
    let cri = env.base().join("cri.sock").to_string_lossy().into_owned();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = busy.local_addr().expect("addr").to_string();
    // A CRI socket another live guard serves: never taken over.
    let served_cri = env.base().join("served-cri.sock");
    let _served = std::os::unix::net::UnixListener::bind(&served_cri).expect("bind CRI socket");
    let served_cri = served_cri.to_string_lossy().into_owned();
    let not_a_socket = env.base().join("cri-file");
    std::fs::write(&not_a_socket, b"kept").expect("write file");
    let not_a_socket = not_a_socket.to_string_lossy().into_owned();
    let a = |overrides: &[(&str, Option<&str>)]| agent_args(&env, overrides);
    let remote = |overrides: &[(&str, Option<&str>)]| {
        let mut all = vec![
            ("--dev-ca", Some("<remove>")),
            ("--ca-trust", Some(trust.as_str())),
        ];
        all.extend_from_slice(overrides);
        agent_args(&env, &all)
    };
    let none = Vec::new;
    let cases: Vec<Case> = vec![
        (
            "missing node id",
            a(&[("--node-id", Some("<remove>"))]),
            none(),
            is("credlet: --node-id (CREDLET_NODE_ID): required, and not set"),
        ),
        (
            "nothing to serve",
            a(&[("--csi-endpoint", Some("<remove>"))]),
            none(),
            is(
                "credlet: --csi-endpoint (CREDLET_CSI_ENDPOINT) and --cri-listen (CREDLET_CRI_LISTEN): neither is set: nothing to serve (--csi-endpoint serves pod certificates, --cri-listen the image guard)",
            ),
        ),
        (
            "relative endpoint",
            a(&[("--csi-endpoint", Some("csi.sock"))]),
            none(),
            is(
                r#"credlet: --csi-endpoint (CREDLET_CSI_ENDPOINT): "csi.sock" must be an absolute socket path"#,
            ),
        ),
        (
            "invalid driver name",
            a(&[("--driver-name", Some("Not A Driver!"))]),
            none(),
            is(
                r#"credlet: --driver-name (CREDLET_DRIVER_NAME): driver name "Not A Driver!" must be 1-63 characters, alphanumerics with '-' and '.' inside"#,
            ),
        ),
        (
            "missing kubelet root",
            a(&[("--kubelet-root", Some(&missing))]),
            none(),
            is(format!(
                "credlet: --kubelet-root (CREDLET_KUBELET_ROOT): {missing}: No such file or directory (os error 2)"
            )),
        ),
        (
            "relative state dir",
            a(&[("--state-dir", Some("state"))]),
            none(),
            is(r#"credlet: --state-dir (CREDLET_STATE_DIR): "state" must be an absolute path"#),
        ),
        (
            "invalid trust domain",
            a(&[("--trust-domain", Some("Bad Domain"))]),
            none(),
            is(
                r#"credlet: --trust-domain (CREDLET_TRUST_DOMAIN): "Bad Domain" must be lowercase letters, digits, '.', '-' and '_'"#,
            ),
        ),
        (
            "unknown log format, from the environment",
            a(&[]),
            vec![("CREDLET_LOG_FORMAT", Some("xml".into()))],
            is(r#"credlet: --log-format (CREDLET_LOG_FORMAT): "xml" is not one of text, json"#),
        ),
        (
            "unparsable log filter",
            a(&[("--log-level", Some("a=b=c"))]),
            none(),
            is(
                r#"credlet: --log-level (CREDLET_LOG_LEVEL): "a=b=c" is neither a level (error, warn, info, debug, trace, off) nor a filter like credlet_csi=debug"#,
            ),
        ),
        (
            "no worker threads",
            a(&[]),
            vec![("CREDLET_WORKER_THREADS", Some("0".into()))],
            is("credlet: --worker-threads (CREDLET_WORKER_THREADS): 0 is not in 1..=64"),
        ),
        (
            "not a duration",
            a(&[("--backoff-base", Some("soon"))]),
            none(),
            is(
                r#"credlet: --backoff-base (CREDLET_BACKOFF_BASE): "soon" is not a duration like 90s, 45m, 24h or 1h30m"#,
            ),
        ),
        (
            "milliseconds are not the duration syntax",
            a(&[("--ca-timeout", Some("500ms"))]),
            none(),
            is(
                r#"credlet: --ca-timeout (CREDLET_CA_TIMEOUT): "500ms" is not a duration like 90s, 45m, 24h or 1h30m"#,
            ),
        ),
        (
            "backoff base above cap",
            a(&[
                ("--backoff-base", Some("10s")),
                ("--backoff-cap", Some("5s")),
            ]),
            none(),
            is(
                "credlet: --backoff-base (CREDLET_BACKOFF_BASE) and --backoff-cap (CREDLET_BACKOFF_CAP): the first retry delay 10s is above the longest 5s",
            ),
        ),
        (
            "a deprecated flag beside its successor",
            a(&[
                ("--backoff-cap", Some("5m")),
                ("--backoff-cap-ms", Some("300000")),
            ]),
            none(),
            is(
                "credlet: --backoff-cap (CREDLET_BACKOFF_CAP) and --backoff-cap-ms (CREDLET_BACKOFF_CAP_MS): exclude each other: give only one",
            ),
        ),
        (
            "development CA and CA service",
            a(&[("--ca-url", Some("https://127.0.0.1:8443"))]),
            none(),
            is(
                "credlet: --dev-ca (CREDLET_DEV_CA) and --ca-url (CREDLET_CA_URL): exclude each other: give only one",
            ),
        ),
        (
            "no CA trust bundle where the manifests mount it",
            agent_args(&env, &[("--dev-ca", Some("<remove>"))]),
            none(),
            is(
                "credlet: --ca-trust (CREDLET_CA_TRUST): cannot read /etc/credlet/ca-trust/ca.crt: No such file or directory (os error 2); it holds the roots of the CA service's serving certificate (or pass --dev-ca for local testing)",
            ),
        ),
        (
            "CA over plain HTTP",
            remote(&[("--ca-url", Some("http://ca:8443"))]),
            none(),
            is(r#"credlet: --ca-url (CREDLET_CA_URL): "http://ca:8443" must be https://host:port"#),
        ),
        (
            "CA timeout out of range",
            remote(&[("--ca-timeout", Some("3m"))]),
            none(),
            is("credlet: --ca-timeout (CREDLET_CA_TIMEOUT): 3m must be between 1s and 2m"),
        ),
        (
            "health address without an ip",
            a(&[("--health-listen", Some("localhost:9808"))]),
            none(),
            is(
                r#"credlet: --health-listen (CREDLET_HEALTH_LISTEN): "localhost:9808" must be ip:port or :port (every address), e.g. 0.0.0.0:8443 or :8443"#,
            ),
        ),
        (
            "busy health port",
            a(&[("--health-listen", Some(&busy))]),
            none(),
            is(format!(
                "credlet: --health-listen (CREDLET_HEALTH_LISTEN): {busy} is in use by another process"
            )),
        ),
        (
            "registration directory missing",
            a(&[("--registration-dir", Some(&missing))]),
            none(),
            is(format!(
                "credlet: --registration-dir (CREDLET_REGISTRATION_DIR): {missing} is not a directory (the kubelet creates <kubelet root>/plugins_registry)"
            )),
        ),
        (
            "relative registration directory",
            a(&[("--registration-dir", Some("plugins_registry"))]),
            none(),
            is(
                r#"credlet: --registration-dir (CREDLET_REGISTRATION_DIR): "plugins_registry" must be an absolute path"#,
            ),
        ),
        (
            "registration path without a registration directory",
            a(&[(
                "--kubelet-registration-path",
                Some("/var/lib/kubelet/plugins/csi.credlet.io/csi.sock"),
            )]),
            none(),
            is(
                "credlet: --kubelet-registration-path (CREDLET_KUBELET_REGISTRATION_PATH): only applies with --registration-dir",
            ),
        ),
        (
            "unknown image policy",
            a(&[("--image-policy", Some("Sometimes"))]),
            none(),
            is(
                r#"credlet: --image-policy (CREDLET_IMAGE_POLICY): "Sometimes" is not one of NeverVerify, NeverVerifyPreloadedImages, NeverVerifyAllowlistedImages, AlwaysVerify"#,
            ),
        ),
        (
            "namespace policy without a policy",
            a(&[
                ("--cri-listen", Some(&cri)),
                ("--image-policy-namespace", Some("ci")),
            ]),
            none(),
            is(
                r#"credlet: --image-policy-namespace (CREDLET_IMAGE_POLICY_NAMESPACE): "ci": must be namespace=Policy"#,
            ),
        ),
        (
            "unreadable registry CA",
            a(&[
                ("--cri-listen", Some(&cri)),
                ("--registry-ca", Some(&missing)),
            ]),
            none(),
            is(format!(
                "credlet: --registry-ca (CREDLET_REGISTRY_CA): cannot read {missing}: No such file or directory (os error 2)"
            )),
        ),
        (
            "CRI socket served by a live process",
            a(&[("--cri-listen", Some(&served_cri))]),
            none(),
            is(format!(
                "credlet: --cri-listen (CREDLET_CRI_LISTEN): {served_cri} is served by another running process; stop it first or choose another path"
            )),
        ),
        (
            "CRI socket path taken by a file",
            a(&[("--cri-listen", Some(&not_a_socket))]),
            none(),
            is(format!(
                "credlet: --cri-listen (CREDLET_CRI_LISTEN): {not_a_socket} exists and is not a socket; refusing to replace it"
            )),
        ),
        (
            "unknown flag",
            a(&[("--frobnicate", None)]),
            none(),
            is("credlet: unknown flag --frobnicate"),
        ),
        (
            "demo lifetime too short",
            vec!["demo".into(), "--lifetime".into(), "1s".into()],
            none(),
            is("credlet: --lifetime (CREDLET_LIFETIME): 1s must be between 2s and 1h"),
        ),
        (
            "demo lifetime from the environment",
            vec!["demo".into()],
            vec![("CREDLET_LIFETIME", Some("4".into()))],
            is(
                r#"credlet: --lifetime (CREDLET_LIFETIME): "4" is not a duration like 90s, 45m, 24h or 1h30m"#,
            ),
        ),
        (
            "no mode",
            Vec::new(),
            none(),
            is(
                "credlet: no mode given: credlet agent, credlet ca or credlet demo (credlet --help)",
            ),
        ),
    ];
    run_cases(&env, cases);
    assert!(
        mounts()
            .iter()
            .all(|m| !m.mount_point.starts_with(env.base()))
    );
}

#[test]
fn ca_configuration_errors_exit_64_with_one_line_naming_flag_and_variable() {
    let env = TestEnv::new(agent_bin!());
    let (_, cert, key) = credlet_ca::Authority::generate_self_signed_with_pems(
        credlet_ca::Policy::new("cluster.local"),
    )
    .expect("CA");
    let cert_path = env.base().join("ca.crt");
    let key_path = env.base().join("ca.key");
    let garbage = env.base().join("garbage.pem");
    std::fs::write(&cert_path, cert).expect("write CA certificate");
    std::fs::write(&key_path, key.as_bytes()).expect("write CA key");
    std::fs::write(&garbage, "not a certificate\n").expect("write garbage");
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let kubeconfig = unreachable_kubeconfig(&env);
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = busy.local_addr().expect("addr").to_string();
    let c = |overrides: &[(&str, Option<&str>)]| {
        let flags: Vec<(&str, Option<String>)> = vec![
            ("--listen", Some("127.0.0.1:0".into())),
            ("--metrics-listen", Some("127.0.0.1:0".into())),
            ("--ca-cert", Some(path(&cert_path))),
            ("--ca-key", Some(path(&key_path))),
            ("--kubeconfig", Some(kubeconfig.clone())),
            (
                "--dns-template",
                Some("$POD_NAME.$POD_NAMESPACE.svc".into()),
            ),
        ];
        with_overrides("ca", flags, overrides)
    };
    let missing = path(&env.base().join("no-such-ca.crt"));
    let base = path(env.base());
    let home = env.base().join("home");
    std::fs::create_dir_all(&home).expect("home");
    // A valid signer name whose ClusterTrustBundle name would be too long.
    let long_signer = format!("credlet.io/{}", "p".repeat(250));
    let long_identity = "i".repeat(129);
    let none = Vec::new;
    let cases: Vec<Case> = vec![
        (
            "listen address without an ip",
            c(&[("--listen", Some("localhost:https"))]),
            none(),
            is(
                r#"credlet: --listen (CREDLET_LISTEN): "localhost:https" must be ip:port or :port (every address), e.g. 0.0.0.0:8443 or :8443"#,
            ),
        ),
        (
            "busy gRPC port",
            c(&[("--listen", Some(&busy))]),
            none(),
            is(format!(
                "credlet: --listen (CREDLET_LISTEN): {busy} is in use by another process"
            )),
        ),
        (
            "busy metrics port",
            c(&[("--metrics-listen", Some(&busy))]),
            none(),
            is(format!(
                "credlet: --metrics-listen (CREDLET_METRICS_LISTEN): {busy} is in use by another process"
            )),
        ),
        (
            "metrics address without a port",
            c(&[("--metrics-listen", Some("127.0.0.1"))]),
            none(),
            is(
                r#"credlet: --metrics-listen (CREDLET_METRICS_LISTEN): "127.0.0.1" must be ip:port or :port (every address), e.g. 0.0.0.0:8443 or :8443"#,
            ),
        ),
        (
            "missing CA certificate file",
            c(&[("--ca-cert", Some(&missing))]),
            none(),
            is(format!(
                "credlet: --ca-cert (CREDLET_CA_CERT): cannot read {missing}: No such file or directory (os error 2)"
            )),
        ),
        (
            "CA key is a directory",
            c(&[("--ca-key", Some(&base))]),
            none(),
            is(format!(
                "credlet: --ca-key (CREDLET_CA_KEY): {base} is not a regular file"
            )),
        ),
        (
            "CA certificate flag absent",
            c(&[("--ca-cert", Some("<remove>"))]),
            none(),
            is("credlet: --ca-cert (CREDLET_CA_CERT): required, and not set"),
        ),
        (
            "CA certificate that is no certificate",
            c(&[("--ca-cert", Some(&path(&garbage)))]),
            none(),
            has(&[
                "credlet: --ca-cert (CREDLET_CA_CERT) and --ca-key (CREDLET_CA_KEY): CA key material from ",
                "garbage.pem",
            ]),
        ),
        (
            "missing kubeconfig file",
            c(&[("--kubeconfig", Some(&missing))]),
            none(),
            has(&[
                "credlet: --kubeconfig (CREDLET_KUBECONFIG): failed to read kubeconfig from ",
                "no-such-ca.crt",
                "No such file or directory (os error 2)",
            ]),
        ),
        (
            "no kubeconfig and not in a pod",
            c(&[("--kubeconfig", Some("<remove>"))]),
            vec![
                ("KUBECONFIG", None),
                ("KUBERNETES_SERVICE_HOST", None),
                ("HOME", Some(path(&home))),
            ],
            has(&[
                "credlet: --kubeconfig (CREDLET_KUBECONFIG): not set, and neither in a pod nor $KUBECONFIG gives the Kubernetes API (",
                "); the CA needs it for TokenReviews and pod lookups",
            ]),
        ),
        (
            "DNS template with a second wildcard",
            c(&[("--dns-template", Some("$POD_NAME.*.example.com"))]),
            none(),
            has(&[
                "credlet: --dns-template (CREDLET_DNS_TEMPLATE): ",
                "$POD_NAME.*.example.com",
            ]),
        ),
        (
            "DNS template with an unknown variable",
            c(&[("--dns-template", Some("$NODE_NAME.example.com"))]),
            none(),
            has(&[
                "credlet: --dns-template (CREDLET_DNS_TEMPLATE): ",
                "$NODE_NAME",
            ]),
        ),
        (
            "minimum lifetime above the maximum",
            c(&[
                ("--min-duration", Some("2h")),
                ("--max-duration", Some("1h")),
            ]),
            none(),
            is(
                "credlet: --min-duration (CREDLET_MIN_DURATION) and --max-duration (CREDLET_MAX_DURATION): the shortest lifetime 2h must not be above the longest 1h",
            ),
        ),
        (
            "zero minimum lifetime",
            c(&[("--min-duration", Some("0s"))]),
            none(),
            is(
                r#"credlet: --min-duration (CREDLET_MIN_DURATION): "0s" must be between 1s and ten years"#,
            ),
        ),
        (
            "empty server name",
            c(&[("--server-name", Some(" "))]),
            none(),
            is("credlet: --server-name (CREDLET_SERVER_NAME): must not be empty"),
        ),
        (
            "unknown token verification",
            c(&[("--token-verification", Some("oidc"))]),
            none(),
            is(
                r#"credlet: --token-verification (CREDLET_TOKEN_VERIFICATION): "oidc" is not one of token-review, jwks"#,
            ),
        ),
        (
            "JWKS refreshed too often (the mode in capitals)",
            c(&[
                ("--token-verification", Some("JWKS")),
                ("--jwks-refresh", Some("5s")),
            ]),
            none(),
            is("credlet: --jwks-refresh (CREDLET_JWKS_REFRESH): 5s must be at least 10s"),
        ),
        (
            "unknown signer API version",
            c(&[("--signer-api-version", Some("v2"))]),
            none(),
            is(
                r#"credlet: --signer-api-version (CREDLET_SIGNER_API_VERSION): "v2" is not one of auto, v1beta1, v1"#,
            ),
        ),
        (
            "signer name without a path (the API version in capitals)",
            c(&[
                ("--signer-name", Some("credlet.io")),
                ("--signer-api-version", Some("V1BETA1")),
            ]),
            none(),
            is(
                r#"credlet: --signer-name (CREDLET_SIGNER_NAME): "credlet.io" must be <domain>/<path>, e.g. credlet.io/pods"#,
            ),
        ),
        (
            "trust bundle name over the API's limit",
            c(&[("--signer-name", Some(long_signer.as_str()))]),
            vec![("POD_NAME", Some("ca-0".into()))],
            has(&[
                "credlet: --trust-bundle-suffix (CREDLET_TRUST_BUNDLE_SUFFIX): ",
                "253",
            ]),
        ),
        (
            "leader identity too long for Events",
            c(&[
                ("--signer-name", Some("credlet.io/pods")),
                ("--leader-election-identity", Some(long_identity.as_str())),
            ]),
            none(),
            is(
                "credlet: --leader-election-identity (CREDLET_LEADER_ELECTION_IDENTITY): is 129 characters; Events allow at most 128",
            ),
        ),
        (
            "renew deadline not below the lease duration",
            c(&[
                ("--signer-name", Some("credlet.io/pods")),
                ("--leader-election-identity", Some("ca-0")),
                ("--leader-election-renew-deadline", Some("20s")),
            ]),
            none(),
            is(
                "credlet: --leader-election-renew-deadline (CREDLET_LEADER_ELECTION_RENEW_DEADLINE) and --leader-election-lease-duration (CREDLET_LEADER_ELECTION_LEASE_DURATION): the renew deadline 20s must be below the lease duration 15s",
            ),
        ),
        (
            "drain timeout given twice, the old way and the new",
            c(&[
                ("--drain-timeout", Some("5s")),
                ("--drain-timeout-s", Some("5")),
            ]),
            none(),
            is(
                "credlet: --drain-timeout (CREDLET_DRAIN_TIMEOUT) and --drain-timeout-s (CREDLET_DRAIN_TIMEOUT_S): exclude each other: give only one",
            ),
        ),
    ];
    run_cases(&env, cases);
}

/// Old flags and variables work for one release, with a warning.
#[tokio::test]
async fn deprecated_flags_and_variables_still_work_and_warn() {
    let mut env = TestEnv::new(agent_bin!());
    env.extra_args = ["--backoff-base-ms", "500", "--dev-ca-min-duration-s", "1"]
        .map(String::from)
        .to_vec();
    let mut command = env.command();
    command
        .args(env.agent_args())
        .env("CREDLET_BACKOFF_CAP_MS", "60000");
    env.spawn_command(command);
    let csi = env.wait_ready().await;
    let volume = env.volume("deprecated");
    csi.publish(&volume).await.expect("publish");
    drop(csi);
    assert!(env.stop().await.success());
    let log = env.log();
    for warning in [
        "--backoff-base-ms (CREDLET_BACKOFF_BASE_MS) is deprecated and will be removed in the next release; use --backoff-base (CREDLET_BACKOFF_BASE) 500ms instead",
        "--backoff-cap-ms (CREDLET_BACKOFF_CAP_MS) is deprecated and will be removed in the next release; use --backoff-cap (CREDLET_BACKOFF_CAP) 1m instead",
        "--dev-ca-min-duration-s (CREDLET_DEV_CA_MIN_DURATION_S) is deprecated",
    ] {
        assert!(log.contains(warning), "no {warning:?} in:\n{log}");
    }

    // A deprecated flag's value is checked like its successor's, the
    // message naming the flag given.
    let mut command = env.command();
    command.args(agent_args(&env, &[("--backoff-base-ms", Some("0"))]));
    let output = run(command, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert_eq!(
        stderr.lines().last(),
        Some("credlet: --backoff-base-ms (CREDLET_BACKOFF_BASE_MS): must be above 0"),
        "{stderr}"
    );

    // Renamed variables still reach their flags: the error names the
    // flag's current variable, after warnings naming the old ones.
    let (_, cert, key) = credlet_ca::Authority::generate_self_signed_with_pems(
        credlet_ca::Policy::new("cluster.local"),
    )
    .expect("CA");
    let cert_path = env.base().join("ca.crt");
    let key_path = env.base().join("ca.key");
    std::fs::write(&cert_path, cert).expect("write CA certificate");
    std::fs::write(&key_path, key.as_bytes()).expect("write CA key");
    let mut command = env.command();
    command
        .arg("ca")
        .arg("--ca-cert")
        .arg(&cert_path)
        .arg("--ca-key")
        .arg(&key_path)
        .env("CREDLET_DNS_TEMPLATES", "$POD_NAME.*.example.com")
        .env("CREDLET_CA_LISTEN", "127.0.0.1:0");
    let output = run(command, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    for warning in [
        "CREDLET_CA_LISTEN is deprecated and will stop working in the next release; rename it CREDLET_LISTEN (--listen)",
        "CREDLET_DNS_TEMPLATES is deprecated and will stop working in the next release; rename it CREDLET_DNS_TEMPLATE (--dns-template)",
    ] {
        assert!(stderr.contains(warning), "no {warning:?} in:\n{stderr}");
    }
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("credlet: --dns-template (CREDLET_DNS_TEMPLATE): ")
            && last.contains("$POD_NAME.*.example.com"),
        "{stderr}"
    );
}

/// `--log-format JSON`, `--image-policy alwaysverify`, `--image-guard-mode
/// AUDIT`: enumerated values ignore case (the CA's are in the table above).
#[tokio::test]
async fn enumerated_values_ignore_case() {
    let mut env = TestEnv::new(agent_bin!());
    env.extra_args = [
        "--log-format",
        "JSON",
        "--image-policy",
        "alwaysverify",
        "--image-guard-mode",
        "AUDIT",
    ]
    .map(String::from)
    .to_vec();
    let _csi = env.start().await;
    assert!(env.stop().await.success());
    let log = env.log();
    let line = log
        .lines()
        .find(|l| !l.starts_with("==== harness"))
        .expect("a log line");
    serde_json::from_str::<serde_json::Value>(line)
        .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
}

/// `:port` listens on every address: the agent's health port and the CA's
/// gRPC and metrics ports answer on 127.0.0.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_port_listens_on_every_address() {
    let mut env = TestEnv::new(agent_bin!());
    let port = credlet_tests::free_port();
    env.extra_args = vec!["--health-listen".into(), format!(":{port}")];
    let _csi = env.start().await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let (code, body) = credlet_tests::http_get(addr, "/healthz").expect("GET /healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    assert!(env.stop().await.success());

    let cluster = credlet_tests::cluster::Cluster::start().expect("fake cluster");
    let mut ca = credlet_tests::cluster::CaProcess::new(agent_bin!(), &cluster).expect("CA");
    let grpc = format!(":{}", ca.port);
    ca.set_arg("--listen", Some(&grpc));
    let metrics = credlet_tests::free_port();
    ca.set_arg("--metrics-listen", Some(&format!(":{metrics}")));
    ca.start().await.expect("CA listening on :port");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{metrics}").parse().expect("addr");
    let (code, _) = credlet_tests::http_get(addr, "/healthz").expect("GET /healthz");
    assert_eq!(code, 200);
    assert!(ca.env.stop().await.success());
}

/// Runs `args` with stdout a pipe whose reader is already gone, as in
/// `credlet ... | head -1` once `head` has quit.
fn run_into_closed_pipe(env: &TestEnv, args: &[&str], timeout: Duration) -> Output {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let mut command = env.command();
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn");
    drop(command);
    let deadline = Instant::now() + timeout;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{args:?} still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let env = TestEnv::new(agent_bin!());
    for args in [
        &["--help"][..],
        &["agent", "--help"],
        &["ca", "--help"],
        &["demo", "--help"],
        &["--version"],
    ] {
        let output = run_into_closed_pipe(&env, args, Duration::from_secs(20));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
    // The demo prints a lot: it runs to its end without printing, cleans
    // up and exits 0 (here with the deprecated --lifetime-s, which warns).
    let dir = env.base().join("demo");
    let output = run_into_closed_pipe(
        &env,
        &[
            "demo",
            "--dir",
            &dir.to_string_lossy(),
            "--lifetime-s",
            "2",
            "--rotations",
            "1",
        ],
        Duration::from_secs(120),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "demo: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("Broken pipe"), "{stderr}");
    assert!(
        stderr.contains("--lifetime-s (CREDLET_LIFETIME_S) is deprecated"),
        "{stderr}"
    );
    let left = credlet_tests::harness::mounts_under(&dir);
    assert!(left.is_empty(), "the demo left mounts: {left:?}");
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
