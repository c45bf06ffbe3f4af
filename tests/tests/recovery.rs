//! Agent restarts: volumes survive SIGTERM and SIGKILL, rotation resumes
//! from the state directory, and damaged volumes are re-issued.

use std::fs;
use std::time::Duration;

use credlet_tests::agent_bin;
use credlet_tests::harness::{
    CheckTime, TestEnv, Volume, check_volume, mount_at, read_volume, wait_for_new_certificate,
    wait_until,
};

const DURATION: &str = "credlet.io/duration";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Term,
    Kill,
}

async fn restart_resumes_rotation(stop: Stop) {
    let mut env = TestEnv::new(agent_bin!());
    let csi = env.start().await;
    let rotating: Vec<Volume> = (0..4)
        .map(|i| env.volume(&format!("rot{i}")).with(DURATION, "4s"))
        .collect();
    let steady = env.volume("steady").with(DURATION, "1h");
    for volume in rotating.iter().chain([&steady]) {
        csi.publish(volume).await.expect("publish");
    }
    let steady_serial = check_volume(&steady.target, &steady.files(), CheckTime::Now)
        .expect("consistent")
        .leaf
        .serial_hex;
    // Let at least one rotation happen before the stop.
    let first = read_volume(&rotating[0].target, &rotating[0].files()).expect("read");
    wait_for_new_certificate(&rotating[0], &first.leaf.serial_hex, Duration::from_secs(8)).await;

    drop(csi);
    match stop {
        Stop::Term => {
            let status = env.stop().await;
            assert_eq!(status.code(), Some(0), "SIGTERM exit: {status}");
        }
        Stop::Kill => env.kill(),
    }

    // While the agent is down, the pods keep their mounted, consistent files.
    let mut serials = Vec::new();
    for volume in rotating.iter().chain([&steady]) {
        assert!(
            mount_at(&volume.target).is_some(),
            "{}: unmounted by the stop",
            volume.id
        );
        let snapshot = check_volume(&volume.target, &volume.files(), CheckTime::WithinValidity)
            .unwrap_or_else(|e| panic!("{}: {e:#}", volume.id));
        serials.push(snapshot.leaf.serial_hex);
        assert!(
            env.state_file(&volume.id).exists(),
            "{}: state record lost",
            volume.id
        );
    }

    let csi = env.start().await;
    for volume in rotating.iter().chain([&steady]) {
        check_volume(&volume.target, &volume.files(), CheckTime::WithinValidity)
            .unwrap_or_else(|e| panic!("{} after restart: {e:#}", volume.id));
    }
    // Rotation resumes for every short-lived volume.
    for (volume, serial) in rotating.iter().zip(&serials) {
        wait_for_new_certificate(volume, serial, Duration::from_secs(8)).await;
    }
    // A volume far from its renewal point keeps its certificate.
    let after = check_volume(&steady.target, &steady.files(), CheckTime::Now).expect("consistent");
    assert_eq!(
        after.leaf.serial_hex, steady_serial,
        "restart re-issued a healthy volume"
    );

    // The restarted agent knows its volumes: an identical republish (the
    // kubelet's periodic one) is accepted without re-issuing, a changed one
    // is a conflict, and unpublish cleans up.
    csi.publish(&steady).await.expect("republish after restart");
    let again = read_volume(&steady.target, &steady.files()).expect("read");
    assert_eq!(again.leaf.serial_hex, steady_serial);
    let changed = steady.clone().with(DURATION, "2h");
    let status = csi
        .publish(&changed)
        .await
        .expect_err("changed attributes accepted");
    assert_eq!(status.code(), tonic::Code::AlreadyExists, "{status:?}");
    for volume in rotating.iter().chain([&steady]) {
        csi.unpublish_volume(volume).await.expect("unpublish");
        assert!(!volume.target.exists());
    }
    assert!(env.mounts().is_empty(), "{:?}", env.mounts());
    assert!(env.state_files().is_empty(), "{:?}", env.state_files());
}

#[tokio::test]
async fn restart_after_sigterm_resumes_rotation() {
    restart_resumes_rotation(Stop::Term).await;
}

#[tokio::test]
async fn restart_after_sigkill_resumes_rotation() {
    restart_resumes_rotation(Stop::Kill).await;
}

/// A kill during the first write of a volume, after `..data` was swapped in
/// but before the visible names were linked, leaves a complete payload that
/// the pod cannot see. The restarted agent must restore the visible names
/// (and the kubelet's retried publish must not be answered "OK" while they
/// are missing).
#[tokio::test]
async fn missing_visible_names_are_restored_on_restart() {
    let mut env = TestEnv::new(agent_bin!());
    let csi = env.start().await;
    let volume = env.volume("unlinked").with(DURATION, "1h");
    csi.publish(&volume).await.expect("publish");
    let serial = check_volume(&volume.target, &volume.files(), CheckTime::Now)
        .expect("consistent")
        .leaf
        .serial_hex;
    drop(csi);
    env.kill();
    for name in volume.files().all() {
        fs::remove_file(volume.target.join(name)).expect("remove visible link");
    }
    assert!(volume.target.join("..data/tls.key").exists());

    let csi = env.start().await;
    csi.publish(&volume)
        .await
        .expect("the kubelet's retried publish");
    let snapshot = wait_until(
        "the visible names to come back",
        Duration::from_secs(10),
        || check_volume(&volume.target, &volume.files(), CheckTime::Now),
    )
    .await;
    // Re-linking the intact payload or re-issuing are both fine.
    eprintln!(
        "visible names restored ({})",
        if snapshot.leaf.serial_hex == serial {
            "same certificate"
        } else {
            "re-issued"
        }
    );
    csi.unpublish_volume(&volume).await.expect("unpublish");
}

/// Volumes damaged while the agent was down are re-issued when it comes
/// back; intact ones keep their certificate; records of deleted targets
/// are dropped. Many damaged volumes at once also exercise the start-up
/// path where recovery and the rotation loop run side by side (a volume
/// whose re-issue timer fires before recovery has registered it must not
/// be forgotten).
#[tokio::test]
async fn damaged_volumes_are_reissued_on_restart() {
    const KEYLESS: usize = 12;
    let mut env = TestEnv::new(agent_bin!());
    let csi = env.start().await;
    let mut names: Vec<String> = ["intact", "dangling", "mismatched", "unmounted", "gone"]
        .iter()
        .map(|n| (*n).to_owned())
        .collect();
    names.extend((0..KEYLESS).map(|i| format!("keyless{i}")));
    let volumes: Vec<Volume> = names
        .iter()
        .map(|n| env.volume(n).with(DURATION, "1h"))
        .collect();
    let mut serials = Vec::new();
    for volume in &volumes {
        csi.publish(volume).await.expect("publish");
        serials.push(
            check_volume(&volume.target, &volume.files(), CheckTime::Now)
                .expect("consistent")
                .leaf
                .serial_hex,
        );
    }
    drop(csi);
    let status = env.stop().await;
    assert!(status.success(), "{status}");

    let [intact, dangling, mismatched, unmounted, gone, keyless @ ..] = &volumes[..] else {
        unreachable!()
    };
    // Key files deleted behind the agent's back.
    for volume in keyless {
        fs::remove_file(volume.target.join("..data/tls.key")).expect("delete key");
    }
    // `..data` pointing at a payload that does not exist.
    fs::remove_file(dangling.target.join("..data")).expect("remove ..data");
    std::os::unix::fs::symlink(
        "..2001_01_01_00_00_00.000000000",
        dangling.target.join("..data"),
    )
    .expect("dangling ..data");
    // A valid key that does not belong to the certificate.
    let stranger = credlet_ca::PrivateKey::generate(credlet_ca::KeyType::EcdsaP256).expect("key");
    fs::write(mismatched.target.join("tls.key"), stranger.pem()).expect("swap key");
    // The tmpfs lost (as after a node reboot) but the kubelet's directory kept.
    rustix::mount::unmount(&unmounted.target, rustix::mount::UnmountFlags::DETACH)
        .expect("unmount");
    assert!(unmounted.target.is_dir());
    // The pod deleted while the agent was down.
    rustix::mount::unmount(&gone.target, rustix::mount::UnmountFlags::DETACH).expect("unmount");
    fs::remove_dir(&gone.target).expect("remove target");

    let csi = env.start().await;
    let damaged = [dangling, mismatched, unmounted]
        .into_iter()
        .chain(keyless)
        .zip(
            [&serials[1], &serials[2], &serials[3]]
                .into_iter()
                .chain(&serials[5..]),
        );
    for (volume, serial) in damaged {
        let fresh = wait_for_new_certificate(volume, serial, Duration::from_secs(10)).await;
        let mount = mount_at(&volume.target).expect("mounted");
        assert_eq!(mount.fstype, "tmpfs", "{}: {mount:?}", volume.id);
        assert_eq!(
            fs::read_dir(&volume.target).expect("list").count(),
            5,
            "{}: leftovers of the damaged payload",
            volume.id
        );
        assert_ne!(fresh.key, stranger.pem());
    }
    let after = check_volume(&intact.target, &intact.files(), CheckTime::Now).expect("consistent");
    assert_eq!(after.leaf.serial_hex, serials[0], "intact volume re-issued");

    wait_until(
        "the gone volume's record to be dropped",
        Duration::from_secs(10),
        || {
            anyhow::ensure!(!env.state_file(&gone.id).exists(), "still recorded");
            Ok(())
        },
    )
    .await;
    assert!(
        !gone.target.exists(),
        "the gone volume's target was recreated"
    );
    assert!(mount_at(&gone.target).is_none());

    for volume in &volumes {
        csi.unpublish_volume(volume).await.expect("unpublish");
    }
    assert!(env.mounts().is_empty(), "{:?}", env.mounts());
    assert!(env.state_files().is_empty(), "{:?}", env.state_files());
}

/// A volume record credlet did not write (here: a copy of a real one with
/// another volume id and the target path of another pod's directory) is
/// refused at start: nothing is mounted over that directory, its files
/// stay visible, and the real volume is recovered as before.
#[tokio::test]
async fn a_forged_volume_record_does_not_mount_over_another_pods_directory() {
    let mut env = TestEnv::new(agent_bin!());
    let csi = env.start().await;
    let real = env.volume("real").with(DURATION, "1h");
    csi.publish(&real).await.expect("publish");
    let serial = check_volume(&real.target, &real.files(), CheckTime::Now)
        .expect("consistent")
        .leaf
        .serial_hex;
    drop(csi);
    assert!(env.stop().await.success());

    // Another pod's volume directory, with its data.
    let victim = env.target_path("0f1e2d3c-7ad9-4cf1-victim", "data");
    fs::create_dir_all(&victim).expect("victim directory");
    fs::write(victim.join("precious"), b"the victim's data").expect("victim file");
    let record = fs::read_to_string(env.state_file(&real.id)).expect("the real record");
    let real_target = real.target.to_str().expect("utf-8");
    assert!(record.contains(real_target) && record.contains("\"csi-real\""));
    let forged = record
        .replace(real_target, victim.to_str().expect("utf-8"))
        .replace("\"csi-real\"", "\"csi-forged\"");
    fs::write(env.state_file("csi-forged"), forged).expect("plant the record");

    let csi = env.start().await;
    assert!(
        mount_at(&victim).is_none(),
        "the agent mounted over another pod's directory: {:?}",
        mount_at(&victim)
    );
    assert_eq!(
        fs::read(victim.join("precious")).expect("the victim's file is visible"),
        b"the victim's data"
    );
    assert!(!env.state_file("csi-forged").exists(), "forged record kept");
    let log = env.log();
    assert!(
        log.lines()
            .any(|l| l.contains("csi-forged") && l.contains("not authentic")),
        "the forged record is not reported"
    );
    let after = check_volume(&real.target, &real.files(), CheckTime::Now).expect("consistent");
    assert_eq!(
        after.leaf.serial_hex, serial,
        "the real volume was re-issued"
    );
    csi.unpublish_volume(&real).await.expect("unpublish");
    assert!(env.mounts().is_empty(), "{:?}", env.mounts());
}
