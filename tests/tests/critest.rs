//! critest (cri-tools' CRI validation suite, pinned in
//! `test-util/k8s/versions.env`) through credlet's image guard gives the
//! same result as directly against the runtime, spec for spec: once for
//! containerd 2 and once for Debian's containerd 1.6.
//!
//! For each runtime: a fresh containerd runs critest directly, then
//! another fresh one (same configuration) runs it through the real
//! `credlet agent` binary (`--cri-listen` in front of `--cri-upstream`,
//! policy `NeverVerifyPreloadedImages`, enforcing, watching an in-process
//! fake API server). critest's images are stand-ins built by the harness
//! (`credlet_test_util::critest::images`) and pulled under their real names
//! from a loopback registry that containerd's `hosts.toml` mirrors point
//! at; nothing leaves the machine. Every spec must end the same way both
//! times: same state, failed or skipped at the same place, with the same
//! gRPC code. Specs that fail directly (the environment: pod sandbox
//! metrics on cgroup v1, Debian's busybox running `ls` as a built-in past a
//! masked `/bin/ls`, the one image whose upstream digest can not be
//! reproduced, containerd 1.6's idempotence answers and missing image
//! volumes) must fail the same way through the guard. Specs that can only
//! time out here (a pod IP or CNI host port reached from the host) are not
//! run (`UNREACHABLE_HERE`).
//!
//! Needs root, `test-util/install-deps.sh` (which builds the pinned
//! programs) and, on first use, a few minutes to build critest.

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use credlet_test_util::FakeApiServer;
use credlet_test_util::critest::{
    CriRuntime, CriTools, CritestOptions, CritestReport, MirrorRegistry, RuntimeKind,
    UNREACHABLE_HERE, compare, run_critest, work_dir,
};
use credlet_tests::agent_bin;
use credlet_tests::cluster::kubeconfig_yaml;
use credlet_tests::harness::TestEnv;

/// The guard's node (`--node-id`); critest's pods are not in the API.
const NODE: &str = "critest-node";
/// The longest one critest run may take (ginkgo's `--timeout`).
const RUN_TIMEOUT: Duration = Duration::from_secs(40 * 60);
/// How long the agent may take to serve and load the pod list.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The agent logs this once the pod watch has listed the node's pods.
const SYNCED: &str = "pod index synced";

/// critest binds fixed host ports (12000-12003) and runs serial specs: one
/// run at a time in this binary.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn critest_through_the_guard_matches_containerd_2() {
    same_outcomes(RuntimeKind::Containerd2);
}

#[test]
fn critest_through_the_guard_matches_debian_containerd_1_6() {
    same_outcomes(RuntimeKind::DebianContainerd);
}

fn same_outcomes(kind: RuntimeKind) {
    if fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(1) != 0 {
        eprintln!(
            "SKIPPED critest {kind:?}: needs root (it runs containers in a private containerd)"
        );
        return;
    }
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let started = Instant::now();
    let tools = CriTools::get().expect("critest (test-util/k8s/build.sh cri-tools)");
    let mirror = MirrorRegistry::start().expect("loopback registry with critest's images");
    eprintln!(
        "critest {} against {kind:?}: {} image names on {} (set up in {:?})",
        tools.version,
        mirror.pushed.len(),
        mirror.registry.host(),
        started.elapsed()
    );

    for (pattern, why) in UNREACHABLE_HERE {
        eprintln!("not run here: /{pattern}/: {why}");
    }
    let (direct, version) = {
        let mut runtime = CriRuntime::start(kind, &mirror.registry).expect("start containerd");
        let work = work_dir("direct").expect("work dir");
        let report = run_critest(&tools, &options(&runtime, runtime.endpoint(), work.path()))
            .expect("critest directly");
        runtime
            .check_running()
            .expect("containerd survived critest");
        (report, runtime.version().to_string())
    };
    eprintln!("{version}");
    eprintln!(
        "directly:          {} in {:?}",
        direct.counts(),
        direct.duration
    );

    let (proxied, guard_log) = {
        let mut runtime = CriRuntime::start(kind, &mirror.registry).expect("start containerd");
        let api = FakeApiServer::start().expect("fake API server");
        let mut guard = Guard::start(&api, runtime.socket(), mirror.registry.ca_pem_path());
        let work = work_dir("guard").expect("work dir");
        let endpoint = format!("unix://{}", guard.socket.display());
        let report = run_critest(&tools, &options(&runtime, endpoint, work.path()))
            .expect("critest via credlet");
        runtime
            .check_running()
            .expect("containerd survived critest");
        assert!(guard.env.agent_running(), "the agent exited during critest");
        guard.env.kill();
        (report, guard.env.log())
    };
    eprintln!(
        "through the guard: {} in {:?}",
        proxied.counts(),
        proxied.duration
    );
    print_failures("directly", &direct);

    let differences = compare(&direct, &proxied);
    if !differences.is_empty() {
        let mut text = String::new();
        for d in &differences {
            let show = |o: &Option<credlet_test_util::critest::SpecOutcome>| {
                o.as_ref()
                    .map_or_else(|| "not run".to_string(), ToString::to_string)
            };
            text.push_str(&format!(
                "\n- {}\n    directly:          {}\n    through the guard: {}\n",
                d.spec,
                show(&d.left),
                show(&d.right)
            ));
        }
        panic!(
            "{} of {} specs end differently through credlet's image guard ({kind:?}):{text}\n\
             guard log (warnings, errors, decisions other than allowed):\n{}",
            differences.len(),
            direct.specs.len(),
            notable_lines(&guard_log)
        );
    }
    eprintln!(
        "{kind:?}: all {} specs (and suite nodes) end the same with and without the guard ({:?} in all)",
        direct.counts().total(),
        started.elapsed()
    );
}

/// critest against `endpoint`, in `runtime`'s IPC namespace.
fn options(runtime: &CriRuntime, endpoint: String, work: &Path) -> CritestOptions {
    CritestOptions {
        endpoint,
        work: work.to_path_buf(),
        timeout: RUN_TIMEOUT,
        ipc_namespace: Some(runtime.ipc_namespace().expect("containerd's IPC namespace")),
        skip: UNREACHABLE_HERE
            .iter()
            .map(|(p, _)| p.to_string())
            .collect(),
    }
}

/// The specs that did not pass in `report`, one line each.
fn print_failures(how: &str, report: &CritestReport) {
    for (name, outcome) in &report.specs {
        if outcome.is_failure() {
            eprintln!("  {how}: {name}: {outcome}");
        }
    }
}

/// The lines of the agent's log that say more than "allowed": warnings,
/// errors and decisions with another outcome.
fn notable_lines(log: &str) -> String {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("WARN")
                || l.contains("ERROR")
                || (l.contains("outcome") && !l.contains("outcome=Allowed"))
        })
        .collect();
    let from = lines.len().saturating_sub(200);
    lines[from..].join("\n")
}

/// The real agent binary with only the image guard on, in front of a
/// runtime socket.
struct Guard {
    env: TestEnv,
    socket: PathBuf,
}

impl Guard {
    /// Starts the agent and waits until it serves its CRI socket with the
    /// (empty) pod list loaded.
    fn start(api: &FakeApiServer, upstream: &Path, registry_ca: PathBuf) -> Self {
        let mut env = TestEnv::new(agent_bin!());
        let base = env.base().to_owned();
        let socket = base.join("cri.sock");
        let kubeconfig = base.join("kubeconfig");
        fs::write(&kubeconfig, kubeconfig_yaml(&api.url())).expect("write kubeconfig");
        let args: Vec<OsString> = vec![
            "agent".into(),
            "--node-id".into(),
            NODE.into(),
            "--state-dir".into(),
            env.state_dir.clone().into(),
            // Unused without CSI, but validated: it must exist.
            "--kubelet-root".into(),
            env.root.clone().into(),
            "--cri-listen".into(),
            socket.clone().into(),
            "--cri-upstream".into(),
            upstream.into(),
            "--image-policy".into(),
            "NeverVerifyPreloadedImages".into(),
            "--image-guard-mode".into(),
            "enforce".into(),
            "--image-records-dir".into(),
            base.join("image-records").into(),
            "--kubeconfig".into(),
            kubeconfig.into(),
            "--registry-ca".into(),
            registry_ca.into(),
        ];
        let mut command = env.command();
        command.args(&args);
        env.spawn_command(command);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            assert!(
                env.agent_running(),
                "agent exited before serving its CRI socket:\n{}",
                env.log()
            );
            if env.log().contains(SYNCED) && socket.exists() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready after {READY_TIMEOUT:?}:\n{}",
                env.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { env, socket }
    }
}
