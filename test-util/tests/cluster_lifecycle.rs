//! `cargo xtask cluster up` and `down` without the xtask: a cluster started
//! in a directory of its own, left running when its value is gone
//! ([`Cluster::detach`]), then removed by [`teardown`]; afterwards no
//! process, mount, cgroup or file of it remains. Needs root and the
//! programs `test-util/k8s/build.sh` builds.

use std::path::Path;

use credlet_test_util::cluster::{Cluster, ClusterOptions, teardown};
use credlet_test_util::mount_points_below;

/// Processes whose command line or environment-free arguments name `dir`.
fn processes_naming(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

#[test]
fn a_detached_cluster_is_torn_down_without_leftovers() {
    let base = tempfile::tempdir().expect("temp dir");
    let dir = base.path().join("cluster");
    let cluster = Cluster::start(ClusterOptions {
        dir: Some(dir.clone()),
        ..Default::default()
    })
    .expect("start the cluster");
    let node = cluster.node_name();
    let cgroup = format!("/sys/fs/cgroup/memory/credlet-{}", node.replace('.', "-"));
    let kubeconfig = cluster.kubeconfig();
    let dir = cluster.dir().to_path_buf();
    cluster.detach();

    // Still serving after the value is gone, as `up` leaves it.
    assert!(kubeconfig.exists());
    assert!(
        !processes_naming(&dir).is_empty(),
        "nothing runs after detach"
    );
    assert!(
        !mount_points_below(&dir).is_empty(),
        "the kubelet root is a mount"
    );
    assert!(Path::new(&cgroup).exists(), "{cgroup} exists while it runs");

    teardown(&dir).expect("teardown");
    // Killed processes may linger as zombies until reaped: give them a moment.
    for _ in 0..50 {
        if processes_naming(&dir).is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let left = processes_naming(&dir);
    assert!(left.is_empty(), "processes left: {left:?}");
    assert!(mount_points_below(&dir).is_empty(), "mounts left");
    assert!(!Path::new(&cgroup).exists(), "{cgroup} left");
    assert!(!dir.exists(), "{} left", dir.display());
}
