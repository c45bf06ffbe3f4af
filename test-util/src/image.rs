//! OCI images written from Rust (no Docker, no umoci): one gzip layer,
//! config, manifest, index, as an OCI image layout directory or archive.
//! Pushing uses `skopeo copy`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};
use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::json;

use crate::process::{WorkDir, run};
use crate::registry::Registry;

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 manifest media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list media type.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The name under which [`crate::Containerd`] imports the pause image and
/// which it configures as `sandbox_image`.
pub const PAUSE_IMAGE: &str = "credlet.test/pause:1";

/// Path of the static pause binary inside every image built here.
pub const PAUSE_PATH: &str = "/pause";

const PAUSE_C: &str = include_str!("pause.c");

/// A static binary that sleeps until SIGTERM/SIGINT and exits 0, built once
/// per process with `cc -static` (needs gcc and libc6-dev).
pub fn pause_binary() -> Result<&'static [u8]> {
    static BIN: OnceLock<Vec<u8>> = OnceLock::new();
    if let Some(b) = BIN.get() {
        return Ok(b);
    }
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("pause.c");
    let out = dir.path().join("pause");
    fs::write(&src, PAUSE_C)?;
    run(
        Command::new(std::env::var_os("CC").unwrap_or_else(|| "cc".into()))
            .args(["-static", "-Os", "-s", "-o"])
            .arg(&out)
            .arg(&src),
    )
    .context("compile the static pause binary (gcc + libc6-dev)")?;
    let bytes = fs::read(&out)?;
    Ok(BIN.get_or_init(|| bytes))
}

/// One file in the image's single layer.
#[derive(Debug, Clone)]
pub struct ImageFile {
    /// Absolute path inside the image.
    pub path: String,
    /// Contents.
    pub data: Vec<u8>,
    /// Permission bits.
    pub mode: u32,
}

/// What to put in an image.
#[derive(Debug, Clone, Default)]
pub struct ImageSpec {
    /// Files of the single layer.
    pub files: Vec<ImageFile>,
    /// Symbolic links of the single layer: (path, target).
    pub links: Vec<(String, String)>,
    /// Config `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// Config `Env` (`PATH=/` when empty).
    pub env: Vec<String>,
    /// A plain tar layer instead of gzip: for large images imported into a
    /// local containerd, where compressing costs more than it saves.
    pub uncompressed: bool,
    /// Annotations of the image's manifest (e.g. the one that makes it a
    /// checkpoint image).
    pub annotations: std::collections::BTreeMap<String, String>,
    /// Config `Cmd` (left out when empty).
    pub cmd: Vec<String>,
    /// Config `User` (`uid`, `name`, `uid:gid`, ...; left out when empty).
    pub user: String,
    /// Empty directories of the layer with their permission bits, e.g.
    /// (`/tmp`, `0o1777`); the parents of files get 0755 on their own.
    pub dirs: Vec<(String, u32)>,
    /// Hard links of the layer: (path, path of a file in `files`), as
    /// busybox images link their applets (a mount over one name leaves
    /// the others alone, unlike a symbolic link to the binary).
    pub hard_links: Vec<(String, String)>,
}

impl ImageSpec {
    /// The pause binary at [`PAUSE_PATH`] as entrypoint, plus `/hello.txt`
    /// holding `marker` (so images built with different markers differ).
    pub fn runnable(marker: &str) -> Result<Self> {
        Ok(Self {
            files: vec![
                ImageFile {
                    path: PAUSE_PATH.into(),
                    data: pause_binary()?.to_vec(),
                    mode: 0o755,
                },
                ImageFile {
                    path: "/hello.txt".into(),
                    data: format!("credlet test image {marker}\n").into_bytes(),
                    mode: 0o644,
                },
            ],
            entrypoint: vec![PAUSE_PATH.into()],
            ..Default::default()
        })
    }
}

/// An image written as an OCI image layout.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The layout directory.
    pub layout: PathBuf,
    /// Tag (`org.opencontainers.image.ref.name`) in the layout's index.
    pub tag: String,
    /// `sha256:…` of the manifest.
    pub manifest_digest: String,
    /// `sha256:…` of the config (containerd's and CRI's image id).
    pub config_digest: String,
    /// `sha256:…` of the compressed layer.
    pub layer_digest: String,
    /// Sum of manifest, config and layer sizes.
    pub total_size: u64,
}

fn sha256_hex(data: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn write_blob(layout: &Path, data: &[u8]) -> Result<String> {
    let hex = sha256_hex(data);
    let dir = layout.join("blobs/sha256");
    fs::create_dir_all(&dir)?;
    fs::write(dir.join(&hex), data)?;
    Ok(format!("sha256:{hex}"))
}

fn layer_tar(spec: &ImageSpec) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dirs_done = std::collections::BTreeSet::new();
    for (path, mode) in &spec.dirs {
        let rel = path.trim_matches('/');
        if rel.is_empty() {
            bail!("image directory {path:?} names no directory");
        }
        let mut acc = String::new();
        let parts: Vec<&str> = rel.split('/').collect();
        for (i, part) in parts.iter().enumerate() {
            acc.push_str(part);
            acc.push('/');
            if dirs_done.insert(acc.clone()) {
                let mode = if i + 1 == parts.len() { *mode } else { 0o755 };
                append_dir(&mut b, &acc, mode)?;
            }
        }
    }
    let entries = spec
        .files
        .iter()
        .map(|f| (f.path.as_str(), Some(f), None))
        .chain(
            spec.links
                .iter()
                .map(|(path, target)| (path.as_str(), None, Some(target.as_str()))),
        );
    for (path, file, link) in entries {
        let rel = path.trim_start_matches('/');
        if rel.is_empty() {
            bail!("image file path {path:?} names no file");
        }
        // Parent directories first, each once.
        let mut acc = String::new();
        let parts: Vec<&str> = rel.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            acc.push_str(part);
            acc.push('/');
            if dirs_done.insert(acc.clone()) {
                append_dir(&mut b, &acc, 0o755)?;
            }
        }
        let mut h = tar::Header::new_gnu();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        match (file, link) {
            (Some(f), _) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(f.mode);
                h.set_size(f.data.len() as u64);
                b.append_data(&mut h, rel, f.data.as_slice())?;
            }
            (None, Some(target)) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, rel, target)?;
            }
            (None, None) => unreachable!("every entry is a file or a link"),
        }
    }
    for (path, target) in &spec.hard_links {
        let rel = path.trim_start_matches('/');
        let target = target.trim_start_matches('/');
        if rel.is_empty()
            || !spec
                .files
                .iter()
                .any(|f| f.path.trim_start_matches('/') == target)
        {
            bail!("hard link {path:?} names no file of the image ({target:?})");
        }
        let mut acc = String::new();
        let parts: Vec<&str> = rel.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            acc.push_str(part);
            acc.push('/');
            if dirs_done.insert(acc.clone()) {
                append_dir(&mut b, &acc, 0o755)?;
            }
        }
        let mut h = tar::Header::new_gnu();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_entry_type(tar::EntryType::Link);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_link(&mut h, rel, target)?;
    }
    Ok(b.into_inner()?)
}

fn append_dir(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) -> Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_path(path)?;
    h.set_mode(mode);
    h.set_size(0);
    h.set_mtime(0);
    h.set_cksum();
    b.append(&h, std::io::empty())?;
    Ok(())
}

/// Writes `spec` as an OCI image layout in `layout` with `tag`; if
/// `containerd_name` is set, the index entry also carries
/// `io.containerd.image.name` (the name `ctr images import` gives it).
pub fn write_oci_layout(
    spec: &ImageSpec,
    layout: &Path,
    tag: &str,
    containerd_name: Option<&str>,
) -> Result<BuiltImage> {
    fs::create_dir_all(layout)?;
    let tar = layer_tar(spec)?;
    let diff_id = format!("sha256:{}", sha256_hex(&tar));
    let (layer, layer_media_type) = if spec.uncompressed {
        (tar, "application/vnd.oci.image.layer.v1.tar")
    } else {
        // Fixed gzip header (mtime 0): identical specs give identical digests.
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        gz.write_all(&tar)?;
        (gz.finish()?, "application/vnd.oci.image.layer.v1.tar+gzip")
    };
    let layer_digest = write_blob(layout, &layer)?;
    let env = if spec.env.is_empty() {
        vec!["PATH=/".to_string()]
    } else {
        spec.env.clone()
    };

    let mut config = json!({
        "architecture": go_arch(),
        "os": "linux",
        "config": {
            "Entrypoint": spec.entrypoint,
            "Env": env,
            "WorkingDir": "/",
        },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created_by": "credlet-test-util" }],
    });
    if !spec.cmd.is_empty() {
        config["config"]["Cmd"] = json!(spec.cmd);
    }
    if !spec.user.is_empty() {
        config["config"]["User"] = json!(spec.user);
    }
    let config = config.to_string();
    let config_digest = write_blob(layout, config.as_bytes())?;

    let mut manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": layer_media_type,
            "digest": layer_digest,
            "size": layer.len(),
        }],
    });
    if !spec.annotations.is_empty() {
        manifest["annotations"] = json!(spec.annotations);
    }
    let manifest = manifest.to_string();
    let manifest_digest = write_blob(layout, manifest.as_bytes())?;

    let mut annotations = serde_json::Map::new();
    annotations.insert("org.opencontainers.image.ref.name".into(), tag.into());
    if let Some(name) = containerd_name {
        annotations.insert("io.containerd.image.name".into(), name.into());
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": { "architecture": go_arch(), "os": "linux" },
            "annotations": annotations,
        }],
    });
    fs::write(layout.join("index.json"), index.to_string())?;
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    Ok(BuiltImage {
        layout: layout.to_path_buf(),
        tag: tag.to_string(),
        manifest_digest,
        config_digest,
        layer_digest,
        total_size: (manifest.len() + config.len() + layer.len()) as u64,
    })
}

/// Tars an OCI layout directory into `archive` (for `ctr images import`).
pub fn write_oci_archive(layout: &Path, archive: &Path) -> Result<()> {
    let f = fs::File::create(archive)?;
    let mut b = tar::Builder::new(f);
    b.follow_symlinks(false);
    b.append_dir_all(".", layout)?;
    b.into_inner()?.sync_all()?;
    Ok(())
}

/// A pushed image.
#[derive(Debug, Clone)]
pub struct PushedImage {
    /// `127.0.0.1:<port>/<repo>:<tag>`.
    pub reference: String,
    /// `127.0.0.1:<port>/<repo>`.
    pub repository: String,
    /// Repository name without host.
    pub name: String,
    /// Tag.
    pub tag: String,
    /// `sha256:…` of the manifest, as the registry serves it.
    pub digest: String,
    /// `sha256:…` of the config: CRI's image id.
    pub config_digest: String,
    /// Compressed layer digest (to spot blob downloads in the access log).
    pub layer_digest: String,
}

impl PushedImage {
    /// `127.0.0.1:<port>/<repo>@sha256:…`.
    pub fn digest_reference(&self) -> String {
        format!("{}@{}", self.repository, self.digest)
    }
}

/// Builds a small runnable image (pause binary + `/hello.txt` naming
/// `host/repo:tag`, so no two pushed images share a digest) and pushes it to `registry` as `repo:tag` with
/// `skopeo copy --dest-creds`. Returns the manifest digest and references.
pub fn build_and_push_image(
    registry: &Registry,
    repo: &str,
    tag: &str,
    creds: (&str, &str),
) -> Result<PushedImage> {
    let spec = ImageSpec::runnable(&format!("{}/{repo}:{tag}", registry.host()))?;
    push_image(registry, repo, tag, creds, &spec)
}

/// Pushes an arbitrary [`ImageSpec`] (see [`build_and_push_image`]).
pub fn push_image(
    registry: &Registry,
    repo: &str,
    tag: &str,
    creds: (&str, &str),
    spec: &ImageSpec,
) -> Result<PushedImage> {
    let work = WorkDir::new("push")?;
    let layout = work.path().join("layout");
    let built = write_oci_layout(spec, &layout, tag, None)?;
    let digest_file = work.path().join("digest");
    let dest = format!("docker://{}/{repo}:{tag}", registry.host());
    run(Command::new("skopeo")
        .env("REGISTRY_AUTH_FILE", work.path().join("auth.json"))
        .env("TMPDIR", work.path())
        .args(["--insecure-policy", "copy", "--quiet", "--dest-creds"])
        .arg(format!("{}:{}", creds.0, creds.1))
        .args(if registry.is_plain_http() {
            // skopeo then falls back to plain HTTP.
            vec!["--dest-tls-verify=false".into()]
        } else {
            vec![
                "--dest-cert-dir".into(),
                registry.cert_dir().as_os_str().to_owned(),
            ]
        })
        .arg("--digestfile")
        .arg(&digest_file)
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(&dest))
    .with_context(|| format!("skopeo push to {dest}"))?;
    let digest = fs::read_to_string(&digest_file)?.trim().to_string();
    if digest != built.manifest_digest {
        bail!(
            "registry digest {digest} differs from the built manifest {} (skopeo rewrote it?)",
            built.manifest_digest
        );
    }
    Ok(PushedImage {
        reference: format!("{}/{repo}:{tag}", registry.host()),
        repository: format!("{}/{repo}", registry.host()),
        name: repo.to_string(),
        tag: tag.to_string(),
        digest,
        config_digest: built.config_digest,
        layer_digest: built.layer_digest,
    })
}

/// Deletes manifest `digest` from `repo` (`skopeo delete`, the registry's
/// garbage collection of an old manifest as far as clients can tell).
pub fn delete_manifest(
    registry: &Registry,
    repo: &str,
    digest: &str,
    creds: (&str, &str),
) -> Result<()> {
    let work = WorkDir::new("delete")?;
    let target = format!("docker://{}/{repo}@{digest}", registry.host());
    run(Command::new("skopeo")
        .env("REGISTRY_AUTH_FILE", work.path().join("auth.json"))
        .args(["delete", "--creds"])
        .arg(format!("{}:{}", creds.0, creds.1))
        .arg("--cert-dir")
        .arg(registry.cert_dir())
        .arg(&target))
    .with_context(|| format!("skopeo delete {target}"))?;
    Ok(())
}

/// Writes the pause image (named [`PAUSE_IMAGE`]) as an OCI archive for
/// `ctr images import`; returns the built image.
pub fn write_pause_archive(dir: &Path, archive: &Path) -> Result<BuiltImage> {
    let spec = ImageSpec {
        files: vec![ImageFile {
            path: PAUSE_PATH.into(),
            data: pause_binary()?.to_vec(),
            mode: 0o755,
        }],
        entrypoint: vec![PAUSE_PATH.into()],
        ..Default::default()
    };
    let tag = PAUSE_IMAGE
        .rsplit_once(':')
        .map(|(_, t)| t)
        .unwrap_or("latest");
    let built = write_oci_layout(&spec, dir, tag, Some(PAUSE_IMAGE))?;
    write_oci_archive(dir, archive)?;
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_deterministic() {
        let spec = ImageSpec {
            files: vec![ImageFile {
                path: "/etc/x/y".into(),
                data: b"hi".to_vec(),
                mode: 0o644,
            }],
            entrypoint: vec!["/y".into()],
            ..Default::default()
        };
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let ia = write_oci_layout(&spec, a.path(), "t", None).unwrap();
        let ib = write_oci_layout(&spec, b.path(), "t", None).unwrap();
        assert_eq!(ia.manifest_digest, ib.manifest_digest);
        let hex = ia.manifest_digest.trim_start_matches("sha256:");
        assert!(a.path().join("blobs/sha256").join(hex).exists());
        let tar = layer_tar(&spec).unwrap();
        let mut ar = tar::Archive::new(tar.as_slice());
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["etc/", "etc/x/", "etc/x/y"]);
    }

    #[test]
    fn directories_hard_links_user_and_cmd() {
        let spec = ImageSpec {
            files: vec![ImageFile {
                path: "/bin/busybox".into(),
                data: b"#!".to_vec(),
                mode: 0o755,
            }],
            hard_links: vec![("/bin/sh".into(), "/bin/busybox".into())],
            dirs: vec![("/tmp".into(), 0o1777), ("/var/run".into(), 0o755)],
            cmd: vec!["sh".into()],
            user: "1003:1004".into(),
            ..Default::default()
        };
        let tar = layer_tar(&spec).unwrap();
        let mut ar = tar::Archive::new(tar.as_slice());
        let entries: Vec<(String, tar::EntryType, u32, Option<String>)> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().display().to_string(),
                    h.entry_type(),
                    h.mode().unwrap(),
                    e.link_name().unwrap().map(|l| l.display().to_string()),
                )
            })
            .collect();
        use tar::EntryType::{Directory, Link, Regular};
        assert_eq!(
            entries,
            [
                ("tmp/".into(), Directory, 0o1777, None),
                ("var/".into(), Directory, 0o755, None),
                ("var/run/".into(), Directory, 0o755, None),
                ("bin/".into(), Directory, 0o755, None),
                ("bin/busybox".into(), Regular, 0o755, None),
                ("bin/sh".into(), Link, 0o755, Some("bin/busybox".into())),
            ]
        );
        let dir = tempfile::tempdir().unwrap();
        let built = write_oci_layout(&spec, dir.path(), "t", None).unwrap();
        let hex = built.config_digest.trim_start_matches("sha256:");
        let config: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.path().join("blobs/sha256").join(hex)).unwrap())
                .unwrap();
        assert_eq!(config["config"]["Cmd"], json!(["sh"]));
        assert_eq!(config["config"]["User"], "1003:1004");

        let dangling = ImageSpec {
            hard_links: vec![("/bin/sh".into(), "/bin/busybox".into())],
            ..Default::default()
        };
        assert!(layer_tar(&dangling).is_err());
    }
}
