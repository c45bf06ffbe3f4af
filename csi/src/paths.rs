//! Validation of the paths and names a CSI caller hands us.
//!
//! Every path input is checked lexically here before anything touches the
//! disk; the filesystem walk in [`crate::target`] then refuses symlinks, so a
//! path that passes both can not be redirected outside the kubelet root.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::error::InputError;

/// Longest volume id we accept (kubelet ids are `csi-<sha256 hex>`, 68 bytes).
pub const MAX_VOLUME_ID_LEN: usize = 128;
/// Longest target path we accept.
pub const MAX_TARGET_PATH_LEN: usize = 4096;
/// Longest file name we accept (one path component).
pub const MAX_FILE_NAME_LEN: usize = 255;

/// A volume id that is safe to use as a file name in the state directory.
/// Clones share one allocation: the volume table and the rotation queue
/// each hold the id of every volume.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeId(std::sync::Arc<str>);

impl VolumeId {
    /// Checks a volume id: 1–128 bytes of `[A-Za-z0-9._:-]`, not starting
    /// with `.`, and no `..` anywhere.
    pub fn parse(raw: &str) -> Result<Self, InputError> {
        if raw.is_empty() {
            return Err(InputError::Missing { field: "volume_id" });
        }
        let bad = |reason: &'static str| InputError::VolumeId {
            volume_id: printable(raw),
            reason,
        };
        if raw.len() > MAX_VOLUME_ID_LEN {
            return Err(bad("longer than 128 bytes"));
        }
        if raw.starts_with('.') || raw.contains("..") {
            return Err(bad("must not start with '.' or contain '..'"));
        }
        if !raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        {
            return Err(bad(
                "only letters, digits, '.', '_', ':' and '-' are allowed",
            ));
        }
        Ok(Self(raw.into()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for VolumeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A target path that is absolute, normalised and strictly below the
/// kubelet root; split into the part below the root for a symlink-refusing
/// walk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetPath {
    full: PathBuf,
    /// Byte offset in `full` where the part below the kubelet root starts.
    below: usize,
}

impl TargetPath {
    /// Checks `raw` lexically against `kubelet_root` (which must itself be
    /// absolute and normalised, e.g. canonicalised at start-up).
    pub fn parse(raw: &str, kubelet_root: &Path) -> Result<Self, InputError> {
        if raw.is_empty() {
            return Err(InputError::Missing {
                field: "target_path",
            });
        }
        let bad = |reason: &'static str| InputError::TargetPath {
            path: printable(raw),
            reason,
        };
        if raw.len() > MAX_TARGET_PATH_LEN {
            return Err(bad("longer than 4096 bytes"));
        }
        if raw.as_bytes().contains(&0) {
            return Err(bad("contains a NUL byte"));
        }
        let path = Path::new(raw);
        if !path.is_absolute() {
            return Err(bad("must be absolute"));
        }
        // `Path::components` silently drops interior `.`; check the raw text.
        if raw.split('/').any(|part| part == "." || part == "..") {
            return Err(bad("must not contain '.' or '..' components"));
        }
        let mut full = PathBuf::new();
        for component in path.components() {
            match component {
                Component::RootDir => full.push("/"),
                Component::Normal(part) => full.push(part),
                Component::CurDir | Component::ParentDir | Component::Prefix(_) => {
                    return Err(bad("must not contain '.' or '..' components"));
                }
            }
        }
        let Ok(below) = full.strip_prefix(kubelet_root) else {
            return Err(bad("must be below the kubelet root directory"));
        };
        if below.as_os_str().is_empty() {
            return Err(bad("must be below the kubelet root directory"));
        }
        let below = full.as_os_str().len() - below.as_os_str().len();
        Ok(Self { full, below })
    }

    /// The normalised absolute path.
    pub fn as_path(&self) -> &Path {
        &self.full
    }

    /// The path below the kubelet root (relative, non-empty); its last
    /// component is the mount point.
    pub fn below_root(&self) -> &Path {
        Path::new(OsStr::from_bytes(
            &self.full.as_os_str().as_bytes()[self.below..],
        ))
    }
}

/// Checks a user-chosen file name: one path component, no NUL, not `.`/`..`,
/// not starting with `..` (reserved for the atomic writer's own entries).
pub fn check_file_name(attribute: &'static str, name: &str) -> Result<(), InputError> {
    let bad = |reason: &'static str| InputError::FileName {
        attribute,
        name: printable(name),
        reason,
    };
    if name.is_empty() {
        return Err(bad("must not be empty"));
    }
    if name.len() > MAX_FILE_NAME_LEN {
        return Err(bad("longer than 255 bytes"));
    }
    if name.contains('/') || name.contains('\0') {
        return Err(bad("must be a single file name without '/' or NUL"));
    }
    if name == "." || name.starts_with("..") {
        return Err(bad("must not be '.' or start with '..'"));
    }
    Ok(())
}

/// Shortens and escapes untrusted input for error messages and logs.
pub(crate) fn printable(raw: &str) -> String {
    const MAX: usize = 160;
    let mut out: String = raw.chars().take(MAX).flat_map(char::escape_debug).collect();
    if raw.chars().nth(MAX).is_some() {
        out.push('…');
    }
    out
}

/// Bytes of an OS string, for `*at` syscalls.
pub(crate) fn os_bytes(s: &OsStr) -> &[u8] {
    s.as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_ids() {
        assert!(VolumeId::parse("csi-0123abcdef").is_ok());
        assert!(VolumeId::parse("vol_1.a:b").is_ok());
        for bad in ["", ".hidden", "a..b", "a/b", "a\0b", "../x", "a b", "ä"] {
            assert!(VolumeId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(VolumeId::parse(&"a".repeat(129)).is_err());
        assert!(VolumeId::parse(&"a".repeat(128)).is_ok());
    }

    #[test]
    fn target_paths() {
        let root = Path::new("/var/lib/kubelet");
        let ok = TargetPath::parse(
            "/var/lib/kubelet/pods/uid/volumes/kubernetes.io~csi/certs/mount",
            root,
        )
        .expect("valid");
        assert_eq!(ok.below_root().components().count(), 6);
        assert_eq!(
            ok.below_root(),
            Path::new("pods/uid/volumes/kubernetes.io~csi/certs/mount")
        );
        assert_eq!(
            ok.as_path(),
            Path::new("/var/lib/kubelet/pods/uid/volumes/kubernetes.io~csi/certs/mount")
        );
        // Trailing and doubled slashes normalise.
        assert!(TargetPath::parse("/var/lib/kubelet//pods/x/", root).is_ok());
        for bad in [
            "",
            "relative/path",
            "/var/lib/kubelet",
            "/var/lib/kubelet/",
            "/var/lib/kubeletx/pods",
            "/etc/passwd",
            "/var/lib/kubelet/pods/../../../etc",
            "/var/lib/kubelet/./pods",
            "/var/lib/kubelet/pods\0/x",
        ] {
            assert!(TargetPath::parse(bad, root).is_err(), "{bad:?} accepted");
        }
        let long = format!("/var/lib/kubelet/{}", "a/".repeat(2100));
        assert!(TargetPath::parse(&long, root).is_err());
    }

    #[test]
    fn file_names() {
        assert!(check_file_name("k", "tls.crt").is_ok());
        assert!(check_file_name("k", ".hidden").is_ok());
        for bad in ["", ".", "..", "..data", "a/b", "/abs", "a\0", "../x"] {
            assert!(check_file_name("k", bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_file_name("k", &"x".repeat(256)).is_err());
    }

    #[test]
    fn printable_escapes_and_truncates() {
        assert_eq!(printable("a\nb"), "a\\nb");
        assert!(printable(&"x".repeat(500)).ends_with('…'));
    }
}
