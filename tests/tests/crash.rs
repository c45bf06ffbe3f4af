//! Crash safety: an agent rotating short-lived certificates is SIGKILLed
//! at random moments, over and over. After every kill each volume must
//! still hold a key and the certificate that belongs to it, with a chain
//! that verifies against the volume's trust bundle; after every restart the
//! same holds and rotation resumes.
//!
//! `CREDLET_CRASH_TRIALS` sets the number of kills (default 100),
//! `CREDLET_CRASH_SEED` the random seed (printed, for replaying a failure).

use std::collections::HashMap;
use std::fs;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use credlet_tests::agent_bin;
use credlet_tests::harness::{
    CheckTime, Snapshot, TestEnv, Volume, check_volume, read_volume, wait_until,
};

const VOLUMES: usize = 8;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Checks every volume; returns the serials.
fn check_all(volumes: &[Volume], at: CheckTime, when: &str) -> Vec<String> {
    volumes
        .iter()
        .map(|v| {
            check_volume(&v.target, &v.files(), at)
                .unwrap_or_else(|e| panic!("{when}: volume {}: {e:#}", v.id))
                .leaf
                .serial_hex
        })
        .collect()
}

/// Payload directories and temporary links beside the current payload:
/// the traces of a write the kill interrupted.
fn leftover_names(volume: &Volume) -> Vec<String> {
    let Ok(current) = fs::read_link(volume.target.join("..data")) else {
        return Vec::new();
    };
    let current = current.to_string_lossy().into_owned();
    fs::read_dir(&volume.target)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("..") && n != "..data" && *n != current)
                .collect()
        })
        .unwrap_or_default()
}

fn leftovers(volume: &Volume) -> usize {
    leftover_names(volume).len()
}

/// Whether any volume has a leftover that is not in `before`.
fn new_leftovers(volumes: &[Volume], before: &[Vec<String>]) -> bool {
    volumes
        .iter()
        .zip(before)
        .any(|(v, old)| leftover_names(v).iter().any(|n| !old.contains(n)))
}

/// Waits until every volume shows a certificate other than the one in
/// `old`, valid now.
async fn wait_all_rotated(volumes: &[Volume], old: &[String], timeout: Duration, when: &str) {
    let mut fresh: HashMap<usize, Snapshot> = HashMap::new();
    wait_until(&format!("{when}: every volume rotated"), timeout, || {
        for (i, volume) in volumes.iter().enumerate() {
            if fresh.contains_key(&i) {
                continue;
            }
            let snapshot = read_volume(&volume.target, &volume.files())?;
            if snapshot.leaf.serial_hex != old[i] {
                let checked = check_volume(&volume.target, &volume.files(), CheckTime::Now)
                    .with_context(|| format!("volume {}", volume.id))?;
                fresh.insert(i, checked);
            }
        }
        if fresh.len() < volumes.len() {
            let waiting: Vec<&str> = volumes
                .iter()
                .enumerate()
                .filter(|(i, _)| !fresh.contains_key(i))
                .map(|(_, v)| v.id.as_str())
                .collect();
            bail!(
                "{} of {} rotated; still on the certificate they had at the kill: {waiting:?}",
                fresh.len(),
                volumes.len()
            );
        }
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_safety_under_rapid_rotation() {
    let trials = env_number("CREDLET_CRASH_TRIALS", 100);
    let seed = env_number("CREDLET_CRASH_SEED", fastrand::u64(..));
    eprintln!("crash test: {trials} trials, seed {seed} (CREDLET_CRASH_SEED to replay)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let started = Instant::now();

    let mut env = TestEnv::new(agent_bin!());
    let csi = env.start().await;
    let volumes: Vec<Volume> = (0..VOLUMES)
        .map(|i| {
            env.volume(&format!("crash{i}"))
                .with("credlet.io/duration", "2s")
        })
        .collect();
    for volume in &volumes {
        csi.publish(volume)
            .await
            .expect("publish (dev CA must allow a 2 s lifetime)");
    }
    drop(csi);
    check_all(&volumes, CheckTime::Now, "after publishing");

    let mut reference = Instant::now();
    let mut mid_write_kills = 0usize;
    let mut recovery_kills = 0usize;
    let mut targeted_kills = 0usize;
    let mut targeted_hits = 0usize;
    let mut ready_times = Vec::new();
    for trial in 0..trials {
        // A kill at a random moment of normal operation: renewals of eight
        // volumes run every 1–1.4 s, so this lands anywhere in their writes.
        let delay = Duration::from_millis(rng.u64(0..=1500));
        tokio::time::sleep_until((reference + delay).into()).await;
        env.kill();
        let when = format!("trial {trial}: right after SIGKILL at +{delay:?}");
        mid_write_kills += usize::from(volumes.iter().any(|v| leftovers(v) > 0));
        let mut at_kill = check_all(&volumes, CheckTime::Now, &when);

        // Every fifth trial also kills the restarted agent at a random
        // moment of its start-up and recovery, before it is ready.
        if trial % 5 == 2 {
            env.spawn();
            let early = Duration::from_millis(rng.u64(0..=60));
            tokio::time::sleep(early).await;
            env.kill();
            recovery_kills += 1;
            mid_write_kills += usize::from(volumes.iter().any(|v| leftovers(v) > 0));
            at_kill = check_all(
                &volumes,
                CheckTime::WithinValidity,
                &format!("trial {trial}: after a kill {early:?} into start-up"),
            );
        }
        // And every fifth aims at the middle of a write: with every volume
        // due, the restarted agent re-issues all of them at once; the kill
        // comes the moment a new payload directory shows up beside `..data`.
        if trial % 5 == 4 {
            tokio::time::sleep(Duration::from_millis(1400)).await;
            let before: Vec<Vec<String>> = volumes.iter().map(leftover_names).collect();
            env.spawn();
            let spawned = Instant::now();
            while spawned.elapsed() < Duration::from_millis(500)
                && !new_leftovers(&volumes, &before)
            {
                std::hint::spin_loop();
            }
            env.kill();
            targeted_kills += 1;
            let hit = new_leftovers(&volumes, &before);
            mid_write_kills += usize::from(hit);
            targeted_hits += usize::from(hit);
            at_kill = check_all(
                &volumes,
                CheckTime::WithinValidity,
                &format!("trial {trial}: after a kill aimed at a write"),
            );
        }

        let spawned = Instant::now();
        env.spawn();
        let csi = env.wait_ready().await;
        ready_times.push(spawned.elapsed());
        drop(csi);
        let when = format!("trial {trial}: after restart");
        check_all(&volumes, CheckTime::WithinValidity, &when);
        wait_all_rotated(&volumes, &at_kill, Duration::from_millis(3500), &when).await;
        reference = Instant::now();
    }

    // Interrupted writes were cleaned up: one payload per volume.
    for volume in &volumes {
        wait_until(
            &format!("{}: a single payload directory", volume.id),
            Duration::from_secs(3),
            || {
                let n = leftovers(volume);
                if n > 0 {
                    bail!("{n} leftovers");
                }
                Ok(())
            },
        )
        .await;
    }

    let csi = env.wait_ready().await;
    for volume in &volumes {
        csi.unpublish_volume(volume).await.expect("unpublish");
        assert!(!volume.target.exists(), "{}: target left", volume.id);
    }
    assert!(env.mounts().is_empty(), "mounts left: {:?}", env.mounts());
    assert!(env.state_files().is_empty(), "{:?}", env.state_files());

    ready_times.sort();
    let median = ready_times
        .get(ready_times.len() / 2)
        .copied()
        .unwrap_or_default();
    eprintln!(
        "crash test: {trials} trials in {:.1?}: {} kills, {mid_write_kills} of them left an \
         interrupted write behind ({targeted_hits} of {targeted_kills} aimed at a write; \
         {recovery_kills} random kills during start-up); restart to ready: median {median:?}, max {:?}",
        started.elapsed(),
        trials as usize + targeted_kills + recovery_kills,
        ready_times.last().copied().unwrap_or_default(),
    );
}
