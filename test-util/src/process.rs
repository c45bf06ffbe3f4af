//! Child processes, private working directories and their cleanup.
//!
//! Every component lives in a directory `$TMPDIR/credlet-tu-<kind>-XXXXXX`
//! that records its owner (pid + start time of the test process). Dropping a
//! guard kills what it started and unmounts what lies below its directory;
//! and every start first sweeps directories whose owner is gone (a test
//! binary killed by SIGKILL runs no destructor), killing only processes
//! whose command line names that directory.

use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustix::process::{Pid, Signal};

const DIR_PREFIX: &str = "credlet-tu-";
const OWNER_FILE: &str = ".owner";
/// Processes started for a directory, one file each (pid + start time):
/// found even when their command line does not name the directory.
const PID_DIR: &str = ".pids";

/// A private working directory, removed (after unmounting anything below
/// it) on drop.
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl WorkDir {
    /// Creates `$TMPDIR/credlet-tu-<kind>-XXXXXX` owned by this process,
    /// after sweeping stale directories of dead owners.
    pub fn new(kind: &str) -> Result<Self> {
        sweep_stale();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{kind}-"))
            .tempdir()
            .context("create harness temp dir")?;
        let path = dir.keep();
        fs::write(path.join(OWNER_FILE), owner_token(std::process::id())?)?;
        Ok(Self {
            path,
            keep: std::env::var_os("CREDLET_TEST_KEEP").is_some(),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        cleanup_dir(&self.path, !self.keep);
    }
}

/// `pid` plus the process start time, so a recycled pid is not mistaken for
/// the owner.
fn owner_token(pid: u32) -> Result<String> {
    Ok(format!(
        "{pid} {}",
        start_time(pid).context("read own start time")?
    ))
}

fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22 (starttime); fields after the `)` closing comm start at 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn owner_alive(dir: &Path) -> bool {
    let Ok(owner) = fs::read_to_string(dir.join(OWNER_FILE)) else {
        // Not yet written (a racing creator) or not ours: leave it alone.
        return true;
    };
    let mut it = owner.split_whitespace();
    let (Some(pid), Some(start)) = (it.next(), it.next()) else {
        return true;
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return true;
    };
    start_time(pid).map(|t| t.to_string()) == Some(start.to_string())
}

/// Cleans up harness directories left behind by test processes that died
/// without running destructors.
pub fn sweep_stale() {
    let tmp = std::env::temp_dir();
    let Ok(entries) = fs::read_dir(&tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with(DIR_PREFIX) || !entry.path().is_dir() {
            continue;
        }
        if !owner_alive(&entry.path()) {
            cleanup_dir(&entry.path(), true);
        }
    }
}

/// Kills every process naming `dir` on its command line, force-deletes runc
/// containers whose state lives below `dir/runc`, unmounts everything below
/// `dir` and (if `remove`) deletes it.
pub(crate) fn cleanup_dir(dir: &Path, remove: bool) {
    let shim_sockets = shim_sockets(&dir.join("state/io.containerd.runtime.v2.task"));
    kill_recorded(dir);
    // Containers first: their processes do not name the dir, their shims do.
    delete_runc_containers(&dir.join("runc"));
    kill_processes_referencing(dir);
    // Shims may have been mid-way through starting a container.
    delete_runc_containers(&dir.join("runc"));
    // A killed shim leaves its socket in /run/containerd/s (a path that
    // containerd 1.6 does not let us move).
    for s in shim_sockets {
        let _ = fs::remove_file(s);
    }
    unmount_below(dir);
    if remove {
        let _ = fs::remove_dir_all(dir);
    }
}

/// Shim sockets named by the task bundles
/// (`<state>/io.containerd.runtime.v2.task/<ns>/<id>/`): the `address`
/// file of containerd 1.6, the `address` field of 2.x's `bootstrap.json`.
fn shim_sockets(tasks: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for ns in fs::read_dir(tasks).into_iter().flatten().flatten() {
        for task in fs::read_dir(ns.path()).into_iter().flatten().flatten() {
            let addr = fs::read_to_string(task.path().join("address"))
                .ok()
                .or_else(|| {
                    let json = fs::read(task.path().join("bootstrap.json")).ok()?;
                    let v: serde_json::Value = serde_json::from_slice(&json).ok()?;
                    v["address"].as_str().map(str::to_string)
                });
            let Some(addr) = addr else {
                continue;
            };
            let path = PathBuf::from(addr.trim().trim_start_matches("unix://"));
            if path.starts_with("/run/containerd/s") {
                out.push(path);
            }
        }
    }
    out
}

/// Records `pid` as started for `dir` under `name` (see [`cleanup_dir`]).
pub(crate) fn record_pid(dir: &Path, name: &str, pid: u32) -> Result<()> {
    let pids = dir.join(PID_DIR);
    fs::create_dir_all(&pids)?;
    fs::write(pids.join(name), owner_token(pid)?)?;
    Ok(())
}

/// SIGKILLs the recorded processes of `dir` that still run (same pid and
/// start time), then forgets them.
fn kill_recorded(dir: &Path) {
    let pids = dir.join(PID_DIR);
    for entry in fs::read_dir(&pids).into_iter().flatten().flatten() {
        let Ok(token) = fs::read_to_string(entry.path()) else {
            continue;
        };
        let mut it = token.split_whitespace();
        if let (Some(pid), Some(start)) = (it.next(), it.next())
            && let Ok(pid) = pid.parse::<u32>()
            && start_time(pid).map(|t| t.to_string()).as_deref() == Some(start)
            && let Some(p) = Pid::from_raw(pid as i32)
        {
            let _ = rustix::process::kill_process(p, Signal::KILL);
        }
        let _ = fs::remove_file(entry.path());
    }
}

/// `runc --root <root>/<namespace> delete --force <id>` for every container.
fn delete_runc_containers(runc_root: &Path) {
    delete_runc_containers_with(Path::new("runc"), runc_root);
}

/// [`delete_runc_containers`] with a given runc (the one that made them).
pub(crate) fn delete_runc_containers_with(runc: &Path, runc_root: &Path) {
    let Ok(namespaces) = fs::read_dir(runc_root) else {
        return;
    };
    for ns in namespaces.flatten() {
        let root = ns.path();
        let Ok(containers) = fs::read_dir(&root) else {
            continue;
        };
        for c in containers.flatten() {
            if !c.path().join("state.json").exists() {
                continue;
            }
            let _ = Command::new(runc)
                .arg("--root")
                .arg(&root)
                .args(["delete", "--force"])
                .arg(c.file_name())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// SIGKILLs processes (other than this one) with an argument that is `dir`
/// or a path below it.
fn kill_processes_referencing(dir: &Path) {
    let me = std::process::id();
    let needle = dir.as_os_str().as_encoded_bytes();
    for _round in 0..3 {
        let mut killed = false;
        let Ok(procs) = fs::read_dir("/proc") else {
            return;
        };
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Ok(cmdline) = fs::read(p.path().join("cmdline")) else {
                continue;
            };
            let names = |arg: &[u8]| {
                arg.starts_with(needle) && (arg.len() == needle.len() || arg[needle.len()] == b'/')
            };
            // `<dir>/x` or `--flag=<dir>/x`.
            let hit = cmdline.split(|b| *b == 0).any(|arg| {
                names(arg)
                    || arg
                        .iter()
                        .position(|b| *b == b'=')
                        .is_some_and(|i| names(&arg[i + 1..]))
            });
            if hit && let Some(pid) = Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(pid, Signal::KILL);
                killed = true;
            }
        }
        if !killed {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Lazily unmounts every mount point at or below `dir`, deepest first.
pub(crate) fn unmount_below(dir: &Path) {
    for _round in 0..3 {
        let mut points = mount_points_below(dir);
        if points.is_empty() {
            return;
        }
        points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for p in points {
            let _ = rustix::mount::unmount(&p, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

/// Mount points at or below `dir`, from /proc/self/mountinfo.
pub fn mount_points_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(f) = fs::File::open("/proc/self/mountinfo") else {
        return Vec::new();
    };
    BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| line.split(' ').nth(4).map(unescape_mountinfo))
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(String::from_utf8_lossy(&out).into_owned())
}

/// A spawned daemon: killed and reaped on drop.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    /// Signal to send first on drop; SIGKILL follows after a grace period.
    graceful: Option<Signal>,
}

impl Daemon {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        log: &Path,
        graceful: Option<Signal>,
    ) -> Result<Self> {
        let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd.spawn().with_context(|| {
            format!(
                "spawn {name} ({:?}); did test-util/install-deps.sh run?",
                cmd.get_program()
            )
        })?;
        Ok(Self {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
            graceful,
        })
    }

    /// The log file (stdout + stderr).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Fails with the log tail if the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            bail!(
                "{} exited early with {status}; log {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log, 40)
            );
        }
        Ok(())
    }

    /// Waits until `addr` accepts TCP connections.
    pub fn wait_for_tcp(&mut self, addr: SocketAddr, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running()?;
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not listen on {addr} within {timeout:?}; log:\n{}",
                    self.name,
                    log_tail(&self.log, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits until a Unix socket at `path` accepts connections.
    pub fn wait_for_unix(&mut self, path: &Path, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running()?;
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not listen on {} within {timeout:?}; log:\n{}",
                    self.name,
                    path.display(),
                    log_tail(&self.log, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Lets the process run on after this value is gone (it is no longer
    /// stopped on drop).
    pub fn detach(mut self) {
        self.child.take();
    }

    /// Stops the process (graceful signal, then SIGKILL after 5 s) and reaps it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let (Some(sig), Some(pid)) = (self.graceful, Pid::from_raw(child.id() as i32)) {
            let _ = rustix::process::kill_process(pid, sig);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last `n` lines of a log file.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Runs a command to completion; fails with its output if it fails.
pub(crate) fn run(cmd: &mut Command) -> Result<std::process::Output> {
    let prog = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(OsStr::to_owned).collect();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {prog:?}; did test-util/install-deps.sh run?"))?;
    if !out.status.success() {
        bail!(
            "{prog:?} {args:?} failed with {}:\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(
            unescape_mountinfo(r"/tmp/a\040b"),
            PathBuf::from("/tmp/a b")
        );
        assert_eq!(unescape_mountinfo("/plain"), PathBuf::from("/plain"));
    }

    #[test]
    fn own_start_time_readable() {
        assert!(start_time(std::process::id()).is_some());
    }
}
