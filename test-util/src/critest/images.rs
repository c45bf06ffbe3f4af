//! Stand-ins for the images critest (cri-tools v1.37.0) pulls, under the
//! names it pulls them by (`pkg/validate/consts*.go`, `pkg/framework`, and
//! the specs' own constants), built here and pushed to a loopback registry
//! that containerd reaches through [`crate::mirror`] `hosts.toml` files.
//!
//! The real images are Docker builds on top of `busybox` (cri-tools'
//! `images/` directory and `images/build`) and Kubernetes' e2e test images;
//! each stand-in has what critest's specs look for in them:
//! - a busybox root (Debian's `busybox-static`, every applet hard-linked
//!   in `/bin`, `Cmd ["sh"]`, upstream busybox's `/etc/passwd` and
//!   `/etc/group`, `/tmp` 1777, small `pgrep` and `ipcs` scripts for the
//!   applets Debian's build lacks) — exec'd commands, users by name;
//! - `test-image-*`: one marker file each, named after the build's `TEST`
//!   argument, so different names are different images and the
//!   `test-image-tags:{1,2,3}` tags are one image;
//! - `test-image-user-*`: the `USER` of `images/build` (`1002`, `www-data`,
//!   `1003:1004`, `www-data:1004`); `test-image-predefined-group`: user 1000
//!   in group 50000 in `/etc/group`;
//! - `nginx`, `hostnet-nginx-<arch>`, `httpd`: a tiny HTTP server
//!   (`webserver.c`) named `nginx` (with nginx's master process title and
//!   `/var/run/nginx.pid`) or `httpd`; the host-network one listens on
//!   127.0.0.1:12003 instead of every address;
//! - `nonewprivs`: a set-uid root program printing its effective uid
//!   (`nnp.c`);
//! - `pause:3.9` (`registry.k8s.io` and `k8s.gcr.io`, one image): the
//!   harness's pause binary, differing from the sandbox image.
//!
//! Not reproducible: `test-image-digest@sha256:9700f9a2…` names the digest
//! of the upstream manifest, which no stand-in can have; its pull fails the
//! same way with or without a proxy in front of the runtime.

use std::collections::HashMap;
use std::fs;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, Result};

use crate::cluster::busybox_spec;
use crate::image::{ImageFile, ImageSpec, PAUSE_PATH, go_arch, pause_binary};
use crate::process::run;

/// Every registry host critest's image names use: each gets a mirror.
pub const MIRRORED_HOSTS: [&str; 3] = ["registry.k8s.io", "gcr.io", "k8s.gcr.io"];

/// cri-tools' own test images (`pkg/validate/consts.go`).
const CRI_TOOLS: &str = "gcr.io/k8s-staging-cri-tools";
/// Kubernetes' e2e test images (`framework.DefaultRegistryE2ETestImagesPrefix`).
const E2E: &str = "registry.k8s.io/e2e-test-images";

/// The image critest can not get here: the digest is upstream's manifest's.
pub const UNREPRODUCIBLE: &str = "gcr.io/k8s-staging-cri-tools/test-image-digest@sha256:9700f9a2f5bf2c45f2f605a0bd3bce7cf37420ec9d3ed50ac2758413308766bf";

/// busybox's `PATH` (the images' `Env`).
const PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Upstream busybox's `/etc/passwd`.
const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
bin:x:2:2:bin:/bin:/bin/false
sys:x:3:3:sys:/dev:/bin/false
sync:x:4:100:sync:/bin:/bin/sync
mail:x:8:8:mail:/var/spool/mail:/bin/false
www-data:x:33:33:www-data:/var/www:/bin/false
operator:x:37:37:Operator:/var:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
";

/// Upstream busybox's `/etc/group`.
const GROUP: &str = "root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
adm:x:4:
tty:x:5:
disk:x:6:
lp:x:7:
mail:x:8:
kmem:x:9:
wheel:x:10:root
cdrom:x:11:
dialout:x:18:
floppy:x:19:
video:x:28:
audio:x:29:
tape:x:32:
www-data:x:33:
operator:x:37:
utmp:x:43:
plugdev:x:46:
staff:x:50:
lock:x:54:
netdev:x:82:
users:x:100:
nogroup:x:65534:
";

/// Debian's busybox-static has no `pgrep` applet; critest runs
/// `pgrep sleep || true` and wants nothing on stderr.
const PGREP: &str = r#"#!/bin/sh
# pgrep PATTERN: the pids of the processes whose name contains PATTERN
# (credlet's stand-in: Debian's busybox-static has no pgrep applet).
found=1
for d in /proc/[0-9]*; do
  read -r name 2>/dev/null <"$d/comm" || continue
  case $name in *"$1"*) echo "${d#/proc/}"; found=0 ;; esac
done
exit $found
"#;

/// Nor `ipcs`: critest looks for a host's shared memory segment id in
/// `ipcs -m` (host IPC) or for its absence (pod IPC).
const IPCS: &str = r#"#!/bin/sh
# ipcs -m: the shared memory segments of this IPC namespace (credlet's
# stand-in: Debian's busybox-static has no ipcs applet).
echo "------ Shared Memory Segments --------"
echo "key        shmid      owner      perms      bytes      nattch"
tail -n +2 /proc/sysvipc/shm | while read -r key shmid perms size cpid lpid nattch uid rest; do
  printf '0x%08x %-10s %-10s %-10s %-10s %s\n' "$key" "$shmid" "$uid" "$perms" "$size" "$nattch"
done
"#;

const WEBSERVER_C: &str = include_str!("webserver.c");
const NNP_C: &str = include_str!("nnp.c");

/// One stand-in image and every name critest pulls it by.
#[derive(Debug, Clone)]
pub struct StandIn {
    /// Full references (`host/repository:tag`), all naming this image.
    pub names: Vec<String>,
    /// The image.
    pub spec: ImageSpec,
}

impl StandIn {
    fn new(names: &[String], spec: ImageSpec) -> Self {
        Self {
            names: names.to_vec(),
            spec,
        }
    }
}

/// Splits `host/repository:tag` into (`host`, `repository`, `tag`).
pub fn split_reference(name: &str) -> (&str, &str, &str) {
    let (host, rest) = name.split_once('/').unwrap_or(("", name));
    let (repo, tag) = rest.rsplit_once(':').unwrap_or((rest, "latest"));
    (host, repo, tag)
}

/// The stand-ins for every image critest v1.37.0's validation specs pull
/// (benchmarks and Windows images aside).
pub fn stand_ins() -> Result<Vec<StandIn>> {
    let arch = go_arch();
    let mut out = Vec::new();
    out.push(StandIn::new(&[format!("{E2E}/busybox:1.29-2")], busybox()?));
    // images/build: IMAGE_TEST, test-image-tags (TEST=same-image),
    // test-image-tag (TEST=test and TEST=all).
    for (names, marker) in [
        (
            vec![format!("{CRI_TOOLS}/test-image-1:latest")],
            "test-image-1",
        ),
        (
            vec![format!("{CRI_TOOLS}/test-image-2:latest")],
            "test-image-2",
        ),
        (
            vec![format!("{CRI_TOOLS}/test-image-3:latest")],
            "test-image-3",
        ),
        (
            vec![format!("{CRI_TOOLS}/test-image-latest:latest")],
            "test-image-latest",
        ),
        (
            (1..=3)
                .map(|t| format!("{CRI_TOOLS}/test-image-tags:{t}"))
                .collect(),
            "same-image",
        ),
        (vec![format!("{CRI_TOOLS}/test-image-tag:test")], "test"),
        (vec![format!("{CRI_TOOLS}/test-image-tag:all")], "all"),
    ] {
        let mut spec = busybox()?;
        spec.files.push(file(&format!("/{marker}"), b"", 0o644));
        out.push(StandIn::new(&names, spec));
    }
    // images/build: IMAGE_USERS.
    for (image, user) in [
        ("test-image-user-uid", "1002"),
        ("test-image-user-username", "www-data"),
        ("test-image-user-uid-group", "1003:1004"),
        ("test-image-user-username-group", "www-data:1004"),
    ] {
        let mut spec = busybox()?;
        spec.user = user.into();
        out.push(StandIn::new(&[format!("{CRI_TOOLS}/{image}:latest")], spec));
    }
    out.push(StandIn::new(
        &[format!("{CRI_TOOLS}/test-image-predefined-group:latest")],
        predefined_group()?,
    ));
    out.push(StandIn::new(
        &[format!("{E2E}/nginx:1.14-2")],
        nginx("0.0.0.0:80")?,
    ));
    // images/hostnet-nginx: nginx on port 12003 of the host's network.
    out.push(StandIn::new(
        &[format!("{CRI_TOOLS}/hostnet-nginx-{arch}:latest")],
        nginx("127.0.0.1:12003")?,
    ));
    out.push(StandIn::new(&[format!("{E2E}/httpd:2.4.39-4")], httpd()?));
    out.push(StandIn::new(
        &[format!("{E2E}/nonewprivs:1.3")],
        nonewprivs()?,
    ));
    let mut pause = ImageSpec {
        files: vec![
            file(PAUSE_PATH, pause_binary()?, 0o755),
            file(
                "/etc/credlet-stand-in",
                b"registry.k8s.io/pause:3.9\n",
                0o644,
            ),
        ],
        entrypoint: vec![PAUSE_PATH.into()],
        ..Default::default()
    };
    pause.env = vec![PATH.into()];
    out.push(StandIn::new(
        &[
            "registry.k8s.io/pause:3.9".to_string(),
            "k8s.gcr.io/pause:3.9".to_string(),
        ],
        pause,
    ));
    Ok(out)
}

fn file(path: &str, data: &[u8], mode: u32) -> ImageFile {
    ImageFile {
        path: path.into(),
        data: data.to_vec(),
        mode,
    }
}

/// The busybox root every stand-in but pause starts from.
fn busybox() -> Result<ImageSpec> {
    let mut spec = busybox_spec()?;
    spec.entrypoint.clear();
    spec.cmd = vec!["sh".into()];
    spec.env = vec![PATH.into()];
    spec.files.extend([
        file("/etc/passwd", PASSWD.as_bytes(), 0o644),
        file("/etc/group", GROUP.as_bytes(), 0o644),
        file("/bin/pgrep", PGREP.as_bytes(), 0o755),
        file("/bin/ipcs", IPCS.as_bytes(), 0o755),
    ]);
    // Applets as hard links, as in busybox images: critest masks /bin/ls
    // and expects /bin/sh to work on.
    let busybox = spec
        .files
        .first()
        .map(|f| f.path.clone())
        .context("busybox_spec has the binary first")?;
    spec.hard_links = std::mem::take(&mut spec.links)
        .into_iter()
        .map(|(path, _)| (path, busybox.clone()))
        .collect();
    spec.dirs = [
        ("/tmp", 0o1777),
        ("/root", 0o700),
        ("/home", 0o755),
        ("/var/spool/mail", 0o755),
        ("/var/www", 0o755),
        ("/usr/sbin", 0o755),
        ("/usr/bin", 0o755),
        ("/sbin", 0o755),
    ]
    .into_iter()
    .map(|(d, m)| (d.to_string(), m))
    .collect();
    Ok(spec)
}

/// images/image-predefined-group: `adduser -u 1000 default-user`,
/// `addgroup -g 50000 group-defined-in-image`, the user in it, `USER 1000`.
fn predefined_group() -> Result<ImageSpec> {
    let mut spec = busybox()?;
    for f in &mut spec.files {
        match f.path.as_str() {
            "/etc/passwd" => f.data.extend_from_slice(
                b"default-user:x:1000:1000:Linux User,,,:/home/default-user:/bin/sh\n",
            ),
            "/etc/group" => f.data.extend_from_slice(
                b"default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n",
            ),
            _ => {}
        }
    }
    spec.dirs.push(("/home/default-user".into(), 0o755));
    spec.user = "1000".into();
    Ok(spec)
}

/// nginx: `nginx -g 'daemon off;'` as its master process, pid file in
/// `/var/run`, listening on `listen`.
fn nginx(listen: &str) -> Result<ImageSpec> {
    let mut spec = busybox()?;
    spec.files.push(file(
        "/usr/sbin/nginx",
        static_binary("webserver", WEBSERVER_C)?,
        0o755,
    ));
    spec.dirs.push(("/var/run".into(), 0o755));
    spec.env.extend([
        format!("WEB_LISTEN={listen}"),
        "WEB_PIDFILE=/var/run/nginx.pid".into(),
        "WEB_TITLE=nginx: master process nginx -g daemon off;".into(),
    ]);
    spec.cmd = vec!["nginx".into(), "-g".into(), "daemon off;".into()];
    Ok(spec)
}

/// httpd: `httpd-foreground` (the httpd image's command), logging a line
/// with "httpd" in it. (busybox's own `httpd` applet would daemonize.)
fn httpd() -> Result<ImageSpec> {
    let mut spec = busybox()?;
    spec.files.push(file(
        "/usr/local/bin/httpd-foreground",
        static_binary("webserver", WEBSERVER_C)?,
        0o755,
    ));
    spec.env.push("WEB_LISTEN=0.0.0.0:80".into());
    spec.cmd = vec!["httpd-foreground".into()];
    Ok(spec)
}

/// nonewprivs: `/usr/local/bin/nnp`, set-uid root, as the entrypoint.
fn nonewprivs() -> Result<ImageSpec> {
    let mut spec = busybox()?;
    spec.files.push(file(
        "/usr/local/bin/nnp",
        static_binary("nnp", NNP_C)?,
        0o4755,
    ));
    spec.cmd.clear();
    spec.entrypoint = vec!["/usr/local/bin/nnp".into()];
    Ok(spec)
}

/// `source` compiled with `cc -static`, once per process and name.
fn static_binary(name: &str, source: &str) -> Result<&'static [u8]> {
    static BUILT: OnceLock<Mutex<HashMap<String, &'static [u8]>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(bytes) = built.get(name) {
        return Ok(bytes);
    }
    let dir = tempfile::tempdir()?;
    let src = dir.path().join(format!("{name}.c"));
    let out = dir.path().join(name);
    fs::write(&src, source)?;
    run(
        Command::new(std::env::var_os("CC").unwrap_or_else(|| "cc".into()))
            .args(["-static", "-Os", "-s", "-o"])
            .arg(&out)
            .arg(&src),
    )
    .with_context(|| format!("compile {name}.c (gcc + libc6-dev)"))?;
    let bytes: &'static [u8] = Vec::leak(fs::read(&out)?);
    built.insert(name.to_string(), bytes);
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split() {
        assert_eq!(
            split_reference("registry.k8s.io/e2e-test-images/busybox:1.29-2"),
            ("registry.k8s.io", "e2e-test-images/busybox", "1.29-2")
        );
        assert_eq!(
            split_reference("gcr.io/k8s-staging-cri-tools/test-image-latest:latest"),
            (
                "gcr.io",
                "k8s-staging-cri-tools/test-image-latest",
                "latest"
            )
        );
    }

    #[test]
    fn every_name_is_on_a_mirrored_host_and_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for s in stand_ins().unwrap() {
            for name in &s.names {
                let (host, _, _) = split_reference(name);
                assert!(MIRRORED_HOSTS.contains(&host), "{name}");
                assert!(seen.insert(name.clone()), "{name} twice");
            }
        }
        assert!(seen.contains("gcr.io/k8s-staging-cri-tools/test-image-tag:all"));
        let (host, _, _) = split_reference(UNREPRODUCIBLE);
        assert!(MIRRORED_HOSTS.contains(&host));
    }
}
