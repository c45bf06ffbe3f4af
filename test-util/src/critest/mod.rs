//! critest, the CRI validation suite of `sigs.k8s.io/cri-tools`, run
//! against a real containerd with its test images served from loopback.
//!
//! - [`CriTools`]: `critest` and `crictl`, built by `k8s/build.sh` at the
//!   version pinned in `k8s/versions.env` and cached outside the clone.
//! - [`images`]: stand-ins for every image critest pulls, under its names;
//!   [`MirrorRegistry`] pushes them to a loopback registry, and
//!   [`CriRuntime`] starts containerd 2 or Debian's containerd 1.6 with
//!   `hosts.toml` mirrors sending those names there.
//! - [`run_critest`]: one run of the validation specs (benchmarks skipped),
//!   in a fixed order, with its JSON report read back per spec
//!   ([`CritestReport`]); [`compare`] lists the specs whose outcome differs
//!   between two runs.

pub mod images;
mod runtime;

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

pub use runtime::{CriRuntime, RuntimeKind};

use crate::image::{PushedImage, push_image};
use crate::process::{WorkDir, log_tail, run};
use crate::registry::Registry;
use crate::token::{ANYONE, Grant};
use images::{StandIn, split_reference, stand_ins};

/// Builds (or finds cached) the programs `names` of `k8s/build.sh`, in that
/// order; returns their directories.
pub(crate) fn built_programs(names: &[&str]) -> Result<Vec<PathBuf>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/build.sh");
    let out = run(Command::new("bash").arg(&script).args(names))
        .with_context(|| format!("build {names:?} with {}", script.display()))?;
    let dirs: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(PathBuf::from)
        .collect();
    if dirs.len() != names.len() {
        bail!(
            "{} printed {} directories for {names:?}",
            script.display(),
            dirs.len()
        );
    }
    Ok(dirs)
}

/// critest and crictl of the pinned cri-tools release.
#[derive(Debug, Clone)]
pub struct CriTools {
    /// The release (`v1.37.0`).
    pub version: String,
    /// `critest` (a `go test -c` binary of `cmd/critest`).
    pub critest: PathBuf,
    /// `crictl`.
    pub crictl: PathBuf,
}

impl CriTools {
    /// Builds them on first use (a few minutes), then finds them cached.
    pub fn get() -> Result<Self> {
        let dir = built_programs(&["cri-tools"])?.remove(0);
        let version = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("cri-tools-"))
            .unwrap_or_default()
            .to_string();
        Ok(Self {
            version,
            critest: dir.join("critest"),
            crictl: dir.join("crictl"),
        })
    }
}

/// The user that pushes the stand-ins; pulls are anonymous.
const PUSHER: (&str, &str) = ("critest-pusher", "critest-pusher-secret");

/// A loopback registry holding every stand-in under its repository path
/// (the host part dropped: a mirror is asked for the same path).
#[derive(Debug)]
pub struct MirrorRegistry {
    /// The registry (token auth: anyone may pull the stand-ins).
    pub registry: Registry,
    /// Every name critest pulls, as pushed.
    pub pushed: BTreeMap<String, PushedImage>,
}

impl MirrorRegistry {
    /// Starts the registry and pushes [`stand_ins`].
    pub fn start() -> Result<Self> {
        let stand_ins = stand_ins()?;
        let mut by_path: BTreeMap<(String, String), usize> = BTreeMap::new();
        for (i, s) in stand_ins.iter().enumerate() {
            for name in &s.names {
                let (_, repo, tag) = split_reference(name);
                if let Some(j) = by_path.insert((repo.into(), tag.into()), i)
                    && j != i
                {
                    bail!("two stand-ins share the mirror path of {name}");
                }
            }
        }
        let repositories: std::collections::BTreeSet<&str> =
            by_path.keys().map(|(r, _)| r.as_str()).collect();
        let grants: Vec<Grant> = repositories
            .iter()
            .flat_map(|r| {
                [
                    Grant::new(ANYONE, r, &["pull"]),
                    Grant::new(PUSHER.0, r, &["pull", "push"]),
                ]
            })
            .collect();
        let registry = Registry::start_token_auth(&[PUSHER], &grants)?;
        let mut pushed = BTreeMap::new();
        for StandIn { names, spec } in &stand_ins {
            for name in names {
                let (_, repo, tag) = split_reference(name);
                let image = push_image(&registry, repo, tag, PUSHER, spec)
                    .with_context(|| format!("push the stand-in of {name}"))?;
                pushed.insert(name.clone(), image);
            }
        }
        Ok(Self { registry, pushed })
    }
}

/// How one spec ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecOutcome {
    /// Ginkgo's node type: `It` for a spec, `BeforeSuite`, ... for suite
    /// setup and teardown.
    pub node_type: String,
    /// Ginkgo's state: `passed`, `failed`, `skipped`, `pending`,
    /// `panicked`, `timedout`, `interrupted`, `aborted`.
    pub state: String,
    /// The failure (or skip) message, if any.
    pub message: String,
    /// Where it failed (`file:line`), if it did.
    pub location: String,
}

impl SpecOutcome {
    /// The gRPC code its message names (`rpc error: code = NotFound ...`),
    /// if any.
    pub fn grpc_code(&self) -> Option<&str> {
        let rest = &self.message[self.message.find("rpc error: code = ")? + 18..];
        let end = rest
            .find(|c: char| !c.is_ascii_alphanumeric())
            .unwrap_or(rest.len());
        Some(&rest[..end])
    }

    /// What two runs must agree on: the state, where it failed or was
    /// skipped, and the gRPC code it failed with (messages differ in ids,
    /// times and paths).
    pub fn same_as(&self, other: &Self) -> bool {
        self.state == other.state
            && self.location == other.location
            && self.grpc_code() == other.grpc_code()
    }

    /// Whether ginkgo counts it as failed.
    pub fn is_failure(&self) -> bool {
        !matches!(self.state.as_str(), "passed" | "skipped" | "pending")
    }
}

impl fmt::Display for SpecOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.state)?;
        if !self.message.is_empty() {
            // The gist: gomega's first lines, not its dump of the error.
            let mut gist = self
                .message
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('<') && *l != "{")
                .take(3)
                .collect::<Vec<_>>()
                .join(" | ");
            if gist.len() > 400 {
                let mut end = 400;
                while !gist.is_char_boundary(end) {
                    end -= 1;
                }
                gist.truncate(end);
                gist.push('…');
            }
            write!(f, ": {gist}")?;
        }
        if !self.location.is_empty() {
            write!(f, " ({})", self.location)?;
        }
        Ok(())
    }
}

/// Passed / failed / skipped, as ginkgo counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Specs that passed.
    pub passed: usize,
    /// Specs that failed (panicked, timed out, ... included).
    pub failed: usize,
    /// Specs skipped (by `-ginkgo.skip` or `Skip(...)`) or pending.
    pub skipped: usize,
}

impl Counts {
    /// Every spec.
    pub fn total(&self) -> usize {
        self.passed + self.failed + self.skipped
    }
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} specs: {} passed, {} failed, {} skipped",
            self.total(),
            self.passed,
            self.failed,
            self.skipped
        )
    }
}

/// One critest run, spec by spec.
#[derive(Debug, Clone)]
pub struct CritestReport {
    /// Outcome by spec (container texts and leaf text, `" / "`-joined;
    /// suite nodes such as `(BeforeSuite)` under their type).
    pub specs: BTreeMap<String, SpecOutcome>,
    /// How long critest ran.
    pub duration: Duration,
    /// critest's exit status (non-zero when a spec failed).
    pub exit_code: Option<i32>,
    /// critest's output.
    pub log: PathBuf,
}

impl CritestReport {
    /// The counts of It specs (suite setup nodes left out).
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for o in self.specs.values() {
            if o.node_type != "It" {
                continue;
            }
            match o.state.as_str() {
                "passed" => c.passed += 1,
                "skipped" | "pending" => c.skipped += 1,
                _ => c.failed += 1,
            }
        }
        c
    }
}

/// Specs that can not pass on a node whose pods are only reachable from
/// inside their own network namespace (`k8s/cni-loopback`: the host routes
/// all of 127/8 to itself, and there is no `portmap` plugin): ginkgo
/// `--skip` patterns and why. Each would fail after a minute of retries,
/// whatever sits in front of the runtime.
pub const UNREACHABLE_HERE: [(&str, &str); 3] = [
    (
        r"runtime should support port mapping with",
        "GETs the pod IP or a host port mapped by CNI portmap",
    ),
    (
        r"runtime should support portforward \[Conformance\]",
        "GETs the pod IP before port-forwarding (the host-network variant runs)",
    ),
    (
        r"when running multiple containers in a pod should support network",
        "GETs the pod IP",
    ),
];

/// What [`run_critest`] runs against and how.
#[derive(Debug, Clone)]
pub struct CritestOptions {
    /// The CRI endpoint (`unix://...`), runtime and image service.
    pub endpoint: String,
    /// Where critest runs and writes (report, output, temporary files).
    pub work: PathBuf,
    /// The longest the whole run may take.
    pub timeout: Duration,
    /// The IPC namespace to run critest in: the runtime's
    /// ([`CriRuntime::ipc_namespace`]), whose segments are its "host" ones.
    pub ipc_namespace: Option<PathBuf>,
    /// ginkgo `--skip` patterns on top of critest's own (`benchmark`).
    pub skip: Vec<String>,
}

/// Runs critest's validation specs (not its benchmarks), one spec at a
/// time (critest's default) in the suite's order. Fails only when critest
/// produced no report (not when specs fail).
pub fn run_critest(tools: &CriTools, opts: &CritestOptions) -> Result<CritestReport> {
    let CritestOptions {
        endpoint,
        work,
        timeout,
        ..
    } = opts;
    let timeout = *timeout;
    let tmp = work.join("tmp");
    fs::create_dir_all(&tmp)?;
    let report = work.join("critest-report.json");
    let log = work.join("critest.log");
    let _ = fs::remove_file(&report);
    let out = fs::File::create(&log)?;
    let err = out.try_clone()?;
    let started = Instant::now();
    let mut command = match &opts.ipc_namespace {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--ipc={}", ns.display()))
                .arg("--")
                .arg(&tools.critest);
            c
        }
        None => Command::new(&tools.critest),
    };
    for pattern in &opts.skip {
        command.arg(format!("-ginkgo.skip={pattern}"));
    }
    let mut child = command
        .current_dir(work)
        // Its log directories and temporary files.
        .env("TMPDIR", &tmp)
        .arg(format!("-runtime-endpoint={endpoint}"))
        .arg(format!("-image-endpoint={endpoint}"))
        .arg(format!("-ginkgo.json-report={}", report.display()))
        // The same order every run, so two runs meet the same state.
        .arg("-ginkgo.randomize-all=false")
        .arg("-ginkgo.seed=1")
        .arg("-ginkgo.no-color")
        .arg(format!("-ginkgo.timeout={}s", timeout.as_secs()))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("spawn {}", tools.critest.display()))?;
    // A margin past ginkgo's own timeout for it to write its report.
    let deadline = started + timeout + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "critest still running after {:?}; output {}:\n{}",
                timeout,
                log.display(),
                log_tail(&log, 40)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let duration = started.elapsed();
    let text = fs::read_to_string(&report).with_context(|| {
        format!(
            "critest ({status}) wrote no report {}; output:\n{}",
            report.display(),
            log_tail(&log, 40)
        )
    })?;
    let specs = parse_report(&text)?;
    Ok(CritestReport {
        specs,
        duration,
        exit_code: status.code(),
        log,
    })
}

/// Reads a ginkgo v2 JSON report (`-ginkgo.json-report`) into outcomes by
/// spec name.
pub fn parse_report(text: &str) -> Result<BTreeMap<String, SpecOutcome>> {
    let suites: Vec<Value> = serde_json::from_str(text).context("parse the ginkgo JSON report")?;
    let mut specs = BTreeMap::new();
    for suite in &suites {
        for spec in suite["SpecReports"].as_array().into_iter().flatten() {
            let texts: Vec<&str> = spec["ContainerHierarchyTexts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let leaf = spec["LeafNodeText"].as_str().unwrap_or_default();
            let kind = spec["LeafNodeType"].as_str().unwrap_or_default();
            let mut name = if kind == "It" {
                texts
                    .into_iter()
                    .chain([leaf])
                    .filter(|t| !t.is_empty())
                    .collect::<Vec<_>>()
                    .join(" / ")
            } else {
                format!("({kind}) {leaf}").trim_end().to_string()
            };
            // Two specs with one name (a table, a repeated node): numbered.
            if specs.contains_key(&name) {
                let mut n = 2;
                while specs.contains_key(&format!("{name} #{n}")) {
                    n += 1;
                }
                name = format!("{name} #{n}");
            }
            let failure = &spec["Failure"];
            let location = match (
                failure["Location"]["FileName"].as_str(),
                failure["Location"]["LineNumber"].as_u64(),
            ) {
                (Some(file), Some(line)) if !file.is_empty() => {
                    let file = file.rsplit('/').next().unwrap_or(file);
                    format!("{file}:{line}")
                }
                _ => String::new(),
            };
            specs.insert(
                name,
                SpecOutcome {
                    node_type: kind.to_string(),
                    state: spec["State"].as_str().unwrap_or("unknown").to_string(),
                    message: failure["Message"].as_str().unwrap_or_default().to_string(),
                    location,
                },
            );
        }
    }
    if specs.is_empty() {
        bail!("the ginkgo report lists no specs");
    }
    Ok(specs)
}

/// A spec whose outcome differs between two runs (`None`: not run there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// The spec.
    pub spec: String,
    /// Its outcome in the first run.
    pub left: Option<SpecOutcome>,
    /// Its outcome in the second run.
    pub right: Option<SpecOutcome>,
}

/// The specs that end differently in `left` and `right`
/// ([`SpecOutcome::same_as`]).
pub fn compare(left: &CritestReport, right: &CritestReport) -> Vec<Difference> {
    let names: std::collections::BTreeSet<&String> =
        left.specs.keys().chain(right.specs.keys()).collect();
    names
        .into_iter()
        .filter_map(|name| {
            let l = left.specs.get(name);
            let r = right.specs.get(name);
            let same = matches!((l, r), (Some(l), Some(r)) if l.same_as(r));
            (!same).then(|| Difference {
                spec: name.clone(),
                left: l.cloned(),
                right: r.cloned(),
            })
        })
        .collect()
}

/// A working directory for one critest run (kept with
/// `CREDLET_TEST_KEEP=1`).
pub fn work_dir(name: &str) -> Result<WorkDir> {
    WorkDir::new(&format!("critest-{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = r#"[{"SuitePath":"/x","SpecReports":[
      {"ContainerHierarchyTexts":null,"LeafNodeType":"BeforeSuite","LeafNodeText":"","State":"passed"},
      {"ContainerHierarchyTexts":["[sig-node] Image Manager"],"LeafNodeType":"It","LeafNodeText":"public image with tag should be pulled and removed [Conformance]","State":"passed","Failure":{}},
      {"ContainerHierarchyTexts":["[sig-node] Image Manager"],"LeafNodeType":"It","LeafNodeText":"public image with digest should be pulled and removed [Conformance]","State":"failed",
       "Failure":{"Message":"failed to pull image\nUnexpected error","Location":{"FileName":"/go/pkg/mod/sigs.k8s.io/cri-tools@v1.37.0/pkg/framework/util.go","LineNumber":406}}},
      {"ContainerHierarchyTexts":["[sig-node] Image Volume","subPath"],"LeafNodeType":"It","LeafNodeText":"should succeed when using a valid subPath","State":"skipped","Failure":{"Message":"not supported"}},
      {"ContainerHierarchyTexts":["benchmark"],"LeafNodeType":"It","LeafNodeText":"lists","State":"skipped"}
    ]}]"#;

    #[test]
    fn report_is_read_spec_by_spec() {
        let specs = parse_report(REPORT).unwrap();
        assert_eq!(specs.len(), 5, "{specs:#?}");
        assert_eq!(specs["(BeforeSuite)"].state, "passed");
        let digest = &specs["[sig-node] Image Manager / public image with digest should be pulled and removed [Conformance]"];
        assert_eq!(digest.state, "failed");
        assert_eq!(digest.location, "util.go:406");
        assert_eq!(
            digest.to_string(),
            "failed: failed to pull image | Unexpected error (util.go:406)"
        );
        assert_eq!(
            specs["[sig-node] Image Volume / subPath / should succeed when using a valid subPath"]
                .message,
            "not supported"
        );
        let report = CritestReport {
            specs,
            duration: Duration::ZERO,
            exit_code: Some(1),
            log: PathBuf::new(),
        };
        assert_eq!(
            report.counts(),
            Counts {
                passed: 1,
                failed: 1,
                skipped: 2
            }
        );
    }

    #[test]
    fn differences_are_by_state_place_and_code() {
        let mut left = CritestReport {
            specs: parse_report(REPORT).unwrap(),
            duration: Duration::ZERO,
            exit_code: Some(1),
            log: PathBuf::new(),
        };
        let mut right = left.clone();
        assert!(compare(&left, &right).is_empty());
        for o in right.specs.values_mut() {
            o.message.push_str(" (other ids)");
        }
        assert!(compare(&left, &right).is_empty());
        let key = "[sig-node] Image Manager / public image with tag should be pulled and removed [Conformance]";
        right.specs.get_mut(key).unwrap().state = "failed".into();
        right.specs.remove("(BeforeSuite)");
        // Failed both ways, with another gRPC code.
        let digest = "[sig-node] Image Manager / public image with digest should be pulled and removed [Conformance]";
        for (report, code) in [(&mut left, "Unknown"), (&mut right, "Internal")] {
            report.specs.get_mut(digest).unwrap().message =
                format!("failed to pull image\nrpc error: code = {code} desc = x");
        }
        assert_eq!(left.specs[digest].grpc_code(), Some("Unknown"));
        let diff = compare(&left, &right);
        assert_eq!(diff.len(), 3, "{diff:#?}");
        assert_eq!(diff[0].spec, "(BeforeSuite)");
        assert!(diff[0].right.is_none());
        assert_eq!(diff[1].spec, digest);
        assert_eq!(diff[2].spec, key);
        assert_eq!(diff[2].left.as_ref().unwrap().state, "passed");
        assert_eq!(diff[2].right.as_ref().unwrap().state, "failed");
    }
}
