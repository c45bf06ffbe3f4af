//! credlet's CSI benchmarks against the real agent binary, real sockets and
//! real tmpfs mounts (run as root). Not a timed test: run it by hand.
//!
//! ```text
//! cargo build --release -p credlet-tests --bins     # builds the bench and the agent
//! cargo run --release -p credlet-tests --bin credlet-bench -- all
//! ```
//!
//! Scenarios: `csi-publish` (NodePublishVolume latency), `csi-rotation`
//! (memory idle and with many volumes, CPU for rotating all of them) or
//! `all`. The agent is the release `credlet-under-test` next to this
//! executable. Each figure is printed next to its goal and the floor cost
//! measured on this machine (DESIGN.md §6), as a ratio.
//!
//! Environment: `CREDLET_BENCH_VOLUMES` (rotation volumes, default 10000),
//! `CREDLET_BENCH_CONCURRENCY` (parallel CSI calls, default 16),
//! `CREDLET_BENCH_DURATION_S` (rotation certificate lifetime; default:
//! chosen from a pilot run so no volume renews before publishing ends),
//! `CREDLET_BENCH_STATE_ON_TMPFS=0` (state directory on the temporary
//! directory's disk instead of a tmpfs like the default `/run/credlet`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use credlet_tests::harness::{
    CheckTime, Csi, TestEnv, Volume, check_volume, cpu_time, mounts_under, rss_kib,
};

/// DESIGN.md §6: one pod certificate (keygen, CSR, sign, PEMs, atomic write).
const FLOOR_ONE_CERTIFICATE: Duration = Duration::from_micros(125);
/// DESIGN.md §6: 10,000 rotations.
const FLOOR_10K_ROTATIONS: Duration = Duration::from_millis(1300);
/// DESIGN.md §6: an idle tokio process.
const FLOOR_IDLE_RSS_KIB: f64 = 2.5 * 1024.0;

const PUBLISH_WARMUP: usize = 100;
const PUBLISH_MEASURED: usize = 2000;
const GOAL_PUBLISH_P99: Duration = Duration::from_millis(3);
const GOAL_IDLE_RSS_KIB: f64 = 8.0 * 1024.0;
const GOAL_LOADED_RSS_KIB: f64 = 32.0 * 1024.0;
const GOAL_ROTATION_CPU: Duration = Duration::from_secs(3);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn agent_binary() -> Result<PathBuf> {
    let bin = std::env::current_exe()?.with_file_name("credlet-under-test");
    ensure!(
        bin.exists(),
        "{} not found: build both binaries with `cargo build --release -p credlet-tests --bins`",
        bin.display()
    );
    Ok(bin)
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn mib(kib: f64) -> String {
    format!("{:.1} MB", kib / 1024.0)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISSED" }
}

/// One result line: `name  value  (goal; floor → ratio)`.
fn line(name: &str, value: &str, note: &str) {
    println!("{name:<34} {value:>12}  ({note})");
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Publish,
    Unpublish,
}

/// Runs `op` on every volume with `concurrency` calls in flight; returns
/// the wall time.
async fn run_all(
    csi: &Csi,
    volumes: &Arc<Vec<Volume>>,
    op: Op,
    concurrency: usize,
) -> Result<Duration> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let csi = csi.clone();
        let volumes = Arc::clone(volumes);
        let next = Arc::clone(&next);
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(volume) = volumes.get(i) else {
                    return Ok::<_, anyhow::Error>(());
                };
                match op {
                    Op::Publish => csi.publish(volume).await,
                    Op::Unpublish => csi.unpublish_volume(volume).await,
                }
                .with_context(|| format!("{op:?} {}", volume.id))?;
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(started.elapsed())
}

fn make_volumes(env: &TestEnv, prefix: &str, count: usize, duration: &str) -> Arc<Vec<Volume>> {
    Arc::new(
        (0..count)
            .map(|i| {
                env.volume(&format!("{prefix}{i:05}"))
                    .with("credlet.io/duration", duration)
            })
            .collect(),
    )
}

async fn bench_publish(env: &mut TestEnv) -> Result<()> {
    println!(
        "== csi-publish: {PUBLISH_MEASURED} NodePublishVolume calls (after {PUBLISH_WARMUP} warm-up), one at a time, embedded CA, real tmpfs"
    );
    let csi = env.start().await;
    let volumes = make_volumes(env, "p", PUBLISH_WARMUP + PUBLISH_MEASURED, "24h");
    let mut publish = Vec::with_capacity(PUBLISH_MEASURED);
    for (i, volume) in volumes.iter().enumerate() {
        let started = Instant::now();
        csi.publish(volume)
            .await
            .with_context(|| format!("publish {}", volume.id))?;
        if i >= PUBLISH_WARMUP {
            publish.push(started.elapsed());
        }
    }
    // Spot-check what was written.
    for volume in volumes.iter().step_by(97) {
        check_volume(&volume.target, &volume.files(), CheckTime::Now)?;
    }
    let mut unpublish = Vec::with_capacity(volumes.len());
    for volume in volumes.iter() {
        let started = Instant::now();
        csi.unpublish_volume(volume)
            .await
            .with_context(|| format!("unpublish {}", volume.id))?;
        unpublish.push(started.elapsed());
    }
    ensure!(
        mounts_under(&env.root).is_empty(),
        "mounts left after unpublishing"
    );
    drop(csi);
    let status = env.stop().await;
    ensure!(status.success(), "agent exited with {status}");

    publish.sort();
    unpublish.sort();
    let floor = FLOOR_ONE_CERTIFICATE.as_secs_f64();
    let ratio = |d: Duration| format!("{:.1}×", d.as_secs_f64() / floor);
    let p50 = percentile(&publish, 0.50);
    let p90 = percentile(&publish, 0.90);
    let p99 = percentile(&publish, 0.99);
    let max = *publish.last().unwrap_or(&Duration::ZERO);
    line(
        "csi-publish p50",
        &ms(p50),
        &format!("floor 125 µs → {}", ratio(p50)),
    );
    line(
        "csi-publish p90",
        &ms(p90),
        &format!("floor 125 µs → {}", ratio(p90)),
    );
    line(
        "csi-publish p99",
        &ms(p99),
        &format!(
            "goal ≤ 3 ms {}; floor 125 µs → {}",
            verdict(p99 <= GOAL_PUBLISH_P99),
            ratio(p99)
        ),
    );
    line(
        "csi-publish max",
        &ms(max),
        &format!("floor 125 µs → {}", ratio(max)),
    );
    line(
        "csi-unpublish p50",
        &ms(percentile(&unpublish, 0.50)),
        "unmount + remove; no floor",
    );
    line(
        "csi-unpublish p99",
        &ms(percentile(&unpublish, 0.99)),
        "unmount + remove; no floor",
    );
    Ok(())
}

/// The payload directory a volume's `..data` link names: it changes with
/// every rotation (the agent logs renewals at debug level only).
fn payload_of(volume: &Volume) -> Option<std::ffi::OsString> {
    std::fs::read_link(volume.target.join("..data"))
        .ok()
        .map(std::path::PathBuf::into_os_string)
}

/// Marks the volumes whose payload changed since `initial` as rotated.
fn scan_rotations(
    volumes: &[Volume],
    initial: &[Option<std::ffi::OsString>],
    rotated: &mut [bool],
) -> usize {
    for (i, volume) in volumes.iter().enumerate() {
        if !rotated[i] && payload_of(volume) != initial[i] {
            rotated[i] = true;
        }
    }
    rotated.iter().filter(|r| **r).count()
}

async fn bench_rotation(env: &mut TestEnv) -> Result<()> {
    let count = env_usize("CREDLET_BENCH_VOLUMES", 10_000);
    let concurrency = env_usize("CREDLET_BENCH_CONCURRENCY", 16);
    println!(
        "== csi-rotation: {count} volumes, {concurrency} concurrent publishes, embedded CA, real tmpfs"
    );
    let csi = env.start().await;
    let pid = env.agent().pid();

    // Idle: memory, and the CPU an idle agent burns (subtracted later).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = rss_kib(pid)? as f64;
    let idle_window = Duration::from_secs(3);
    let cpu_before = cpu_time(pid)?;
    tokio::time::sleep(idle_window).await;
    let idle_cpu_rate = (cpu_time(pid)? - cpu_before).as_secs_f64() / idle_window.as_secs_f64();

    // Lifetime: renewals start at 50 % of it, which must come after the
    // last publish. A pilot run estimates how long publishing takes.
    let duration_s = match std::env::var("CREDLET_BENCH_DURATION_S") {
        Ok(v) => v.parse::<u64>().context("CREDLET_BENCH_DURATION_S")?,
        Err(_) => {
            let pilot = make_volumes(env, "pilot", 500.min(count), "24h");
            let took = run_all(&csi, &pilot, Op::Publish, concurrency).await?;
            run_all(&csi, &pilot, Op::Unpublish, concurrency).await?;
            let estimate = took.as_secs_f64() * count as f64 / pilot.len().max(1) as f64;
            (estimate * 3.0).ceil().max(40.0) as u64
        }
    };

    let volumes = make_volumes(env, "r", count, &format!("{duration_s}s"));
    let publish_wall = run_all(&csi, &volumes, Op::Publish, concurrency).await?;
    let published_at = Instant::now();
    let cpu_start = cpu_time(pid)?;
    let loaded_rss = rss_kib(pid)? as f64;

    // Watch every volume's payload until each has been replaced once.
    let initial: Vec<_> = volumes.iter().map(payload_of).collect();
    ensure!(
        initial.iter().all(Option::is_some),
        "every published volume has a payload"
    );
    let mut rotated = vec![false; count];
    let early = scan_rotations(&volumes, &initial, &mut rotated);
    let deadline = published_at + Duration::from_secs(duration_s) + Duration::from_secs(60);
    loop {
        let done = scan_rotations(&volumes, &initial, &mut rotated);
        if done == count {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "only {done} of {count} volumes rotated within {duration_s} s + 60 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let rotation_wall = published_at.elapsed();
    let cpu_used = cpu_time(pid)? - cpu_start;
    let idle_share = Duration::from_secs_f64(idle_cpu_rate * rotation_wall.as_secs_f64());
    let rotation_cpu = cpu_used.saturating_sub(idle_share);
    let rotated_rss = rss_kib(pid)? as f64;

    // The files agree with the log: a sample is consistent and fresh.
    for volume in volumes.iter().step_by((count / 200).max(1)) {
        check_volume(&volume.target, &volume.files(), CheckTime::Now)?;
    }
    let log = env.log();
    let failures = log.matches("renewal failed").count();

    let unpublish_wall = run_all(&csi, &volumes, Op::Unpublish, concurrency).await?;
    ensure!(
        mounts_under(&env.root).is_empty(),
        "mounts left after unpublishing"
    );
    drop(csi);
    let status = env.stop().await;
    ensure!(status.success(), "agent exited with {status}");

    line(
        "csi-rotation idle RSS",
        &mib(idle_rss),
        &format!(
            "goal ≤ 8 MB {}; floor idle tokio 2.5 MB → {:.1}×",
            verdict(idle_rss <= GOAL_IDLE_RSS_KIB),
            idle_rss / FLOOR_IDLE_RSS_KIB
        ),
    );
    line(
        &format!("csi-rotation RSS, {count} volumes"),
        &mib(loaded_rss),
        &format!(
            "goal ≤ 32 MB {}; {:.2} KB per volume above idle; after rotating {}",
            verdict(loaded_rss <= GOAL_LOADED_RSS_KIB),
            (loaded_rss - idle_rss) / count as f64,
            mib(rotated_rss)
        ),
    );
    line(
        &format!("csi-rotation publish {count}"),
        &format!("{:.2} s", publish_wall.as_secs_f64()),
        &format!(
            "{concurrency} concurrent; {:.0}/s; {:.3} ms each",
            count as f64 / publish_wall.as_secs_f64(),
            publish_wall.as_secs_f64() * 1e3 / count as f64
        ),
    );
    let scaled_floor = FLOOR_10K_ROTATIONS.as_secs_f64() * count as f64 / 10_000.0;
    line(
        &format!("csi-rotation CPU, {count} rotations"),
        &format!("{:.2} s", rotation_cpu.as_secs_f64()),
        &format!(
            "goal ≤ {:.1} s {}; floor {:.2} s → {:.1}×",
            GOAL_ROTATION_CPU.as_secs_f64() * count as f64 / 10_000.0,
            verdict(
                rotation_cpu.as_secs_f64()
                    <= GOAL_ROTATION_CPU.as_secs_f64() * count as f64 / 10_000.0
            ),
            scaled_floor,
            rotation_cpu.as_secs_f64() / scaled_floor
        ),
    );
    line(
        "csi-rotation details",
        &format!("{duration_s} s"),
        &format!(
            "lifetime; all rotated {:.1} s after publishing; {:.2} s CPU measured, {:.2} s idle share subtracted; \
             {early} already rotated when publishing ended; {failures} failed renewals",
            rotation_wall.as_secs_f64(),
            cpu_used.as_secs_f64(),
            idle_share.as_secs_f64()
        ),
    );
    line(
        &format!("csi-rotation unpublish {count}"),
        &format!("{:.2} s", unpublish_wall.as_secs_f64()),
        &format!("{concurrency} concurrent"),
    );
    Ok(())
}

/// Runs one scenario in a fresh environment; on failure prints the tail of
/// the agent's log before the environment (and its mounts) goes away.
async fn scenario(bin: &Path, name: &str) -> Result<()> {
    let mut env = TestEnv::new(bin);
    // The agent's default state directory is /run/credlet, a tmpfs: measure
    // that (CREDLET_BENCH_STATE_ON_TMPFS=0 measures a disk state directory).
    if !std::env::var("CREDLET_BENCH_STATE_ON_TMPFS").is_ok_and(|v| v == "0") {
        // The state directory on tmpfs (e.g. /run): records then cost no
        // disk journal work. They only matter while the tmpfs volumes
        // exist, and those do not survive a reboot either.
        std::fs::create_dir_all(&env.state_dir)?;
        rustix::mount::mount(
            "credlet-bench-state",
            &env.state_dir,
            "tmpfs",
            rustix::mount::MountFlags::NODEV | rustix::mount::MountFlags::NOSUID,
            c"mode=0700",
        )
        .context("mount tmpfs on the state directory")?;
        println!("(state directory on tmpfs)");
    }
    let result = match name {
        "csi-publish" => bench_publish(&mut env).await,
        "csi-rotation" => bench_rotation(&mut env).await,
        other => Err(anyhow::anyhow!("unknown scenario {other:?}")),
    };
    if result.is_err() {
        let log = env.log();
        let tail: String = log
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        eprintln!("---- last lines of the agent log ----\n{tail}\n----");
    }
    result
}

async fn run(which: &str) -> Result<()> {
    let bin = agent_binary()?;
    println!("credlet-bench: agent {}", bin.display());
    match which {
        "all" => {
            scenario(&bin, "csi-publish").await?;
            scenario(&bin, "csi-rotation").await
        }
        one => scenario(&bin, one).await,
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = match args.as_slice() {
        [one] if ["csi-publish", "csi-rotation", "all"].contains(&one.as_str()) => one.clone(),
        _ => {
            eprintln!("usage: credlet-bench <csi-publish|csi-rotation|all>");
            eprintln!("build first: cargo build --release -p credlet-tests --bins");
            return ExitCode::from(2);
        }
    };
    if !rustix::process::geteuid().is_root() {
        eprintln!("credlet-bench: needs root (the agent mounts tmpfs volumes)");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("credlet-bench: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&which)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("credlet-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}
