//! Images the test node runs, built here and imported into its containerd
//! (the node has them without a pull): programs of this workspace with the
//! shared libraries they load, and Debian's static busybox for shells.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use super::Cluster;
use crate::image::{ImageFile, ImageSpec, write_oci_archive, write_oci_layout};
use crate::process::run;

/// Debian's `busybox-static` (test-util/install-deps.sh installs it).
const BUSYBOX: &str = "/bin/busybox";

/// The busybox image's name on the node: `sh`, `cat`, `sleep`, `nc`, ...
/// on `PATH`.
pub const BUSYBOX_IMAGE: &str = "credlet.test/busybox:1";

/// The files of an image holding `binaries` (host path, path in the image)
/// with the shared libraries they load (found with `ldd`), at the paths the
/// dynamic loader looks for them, plus an `/etc/nsswitch.conf` naming
/// only `files` and `dns` (glibc has both built in).
pub fn binary_files(binaries: &[(&Path, &str)]) -> Result<Vec<ImageFile>> {
    let mut files = Vec::new();
    let mut libs = std::collections::BTreeSet::new();
    for (host, path) in binaries {
        files.push(ImageFile {
            path: (*path).to_string(),
            data: fs::read(host).with_context(|| format!("read {}", host.display()))?,
            mode: 0o755,
        });
        let out = run(Command::new("ldd").arg(host))?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"; vdso has no path.
            let lib = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line
                    .split_whitespace()
                    .next()
                    .filter(|p| p.starts_with('/')),
            };
            if let Some(lib) = lib.filter(|l| l.starts_with('/')) {
                libs.insert(lib.to_string());
            }
        }
    }
    for lib in libs {
        files.push(ImageFile {
            data: fs::read(&lib).with_context(|| format!("read {lib}"))?,
            path: lib,
            mode: 0o755,
        });
    }
    files.push(ImageFile {
        path: "/etc/nsswitch.conf".into(),
        data: b"hosts: files dns\n".to_vec(),
        mode: 0o644,
    });
    Ok(files)
}

/// An image of busybox with a link for each applet in `/bin`.
pub fn busybox_spec() -> Result<ImageSpec> {
    let out = run(Command::new(BUSYBOX).arg("--list"))
        .context("list busybox applets (install busybox-static)")?;
    let links = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|a| !a.is_empty() && *a != "busybox")
        .map(|a| (format!("/bin/{a}"), "busybox".to_string()))
        .collect();
    Ok(ImageSpec {
        files: vec![ImageFile {
            path: BUSYBOX.into(),
            data: fs::read(BUSYBOX).with_context(|| format!("read {BUSYBOX}"))?,
            mode: 0o755,
        }],
        links,
        entrypoint: vec!["/bin/sh".into()],
        env: vec!["PATH=/bin".into()],
        ..Default::default()
    })
}

impl Cluster {
    /// Builds `spec` as `name` (`host/repo:tag`) and imports it into the
    /// node's containerd.
    pub fn load_image(&self, name: &str, spec: &ImageSpec) -> Result<()> {
        let work = self.dir().join("image-build");
        let _ = fs::remove_dir_all(&work);
        let layout = work.join("layout");
        let tag = name.rsplit_once(':').map_or("latest", |(_, t)| t);
        write_oci_layout(spec, &layout, tag, Some(name))?;
        let archive = work.join("image.tar");
        write_oci_archive(&layout, &archive)?;
        let imported = self.import_image(&archive);
        let _ = fs::remove_dir_all(&work);
        imported
    }

    /// Loads the busybox image ([`BUSYBOX_IMAGE`]).
    pub fn load_busybox(&self) -> Result<()> {
        self.load_image(BUSYBOX_IMAGE, &busybox_spec()?)
    }
}
