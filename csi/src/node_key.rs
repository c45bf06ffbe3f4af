//! The agent's node-local secret: an HMAC key that authenticates what the
//! agent keeps in its state directory (volume records, the CA's trust
//! bundle), so that a file it did not write is never acted on.
//!
//! The key is 32 random bytes in `<state-dir>/node-secret` (mode 0600),
//! made on first start. Each kind of file has its own [`Purpose`] label in
//! the MAC input, so a tag made for one kind never verifies as another.
//! Root on the node can read the key; it guards against files written or
//! changed by anything that can write the state directory but is not this
//! agent (a restored backup, a copy from another node, a hostPath shared by
//! mistake), not against root.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ring::hmac;

use crate::error::Error;

/// Name of the key file in the state directory.
pub const NODE_SECRET_FILE: &str = "node-secret";
const SECRET_LEN: usize = 32;

/// What a tag is for; part of the MAC input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A volume record under `<state-dir>/volumes/`.
    VolumeRecord,
    /// The CA's trust bundle kept for the next start.
    CaTrustBundle,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Self::VolumeRecord => b"credlet volume record v2\0",
            Self::CaTrustBundle => b"credlet ca trust bundle v1\0",
        }
    }
}

/// The node-local HMAC-SHA256 key.
#[derive(Clone)]
pub struct NodeKey {
    key: hmac::Key,
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodeKey(..)")
    }
}

impl NodeKey {
    /// Reads `<state_dir>/node-secret`, creating it (mode 0600, and the
    /// directory if missing) on first use. Safe against a concurrent first start: the
    /// file appears complete or not at all, and the first one made wins.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, Error> {
        fs::create_dir_all(state_dir)
            .map_err(|e| Error::io("create state directory", state_dir, e))?;
        let path = state_dir.join(NODE_SECRET_FILE);
        match fs::read(&path) {
            Ok(bytes) => Self::from_bytes(&path, &bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let secret = create_secret(&path)?;
                Self::from_bytes(&path, &secret)
            }
            Err(e) => Err(Error::io("read node secret", &path, e)),
        }
    }

    /// A key from raw bytes (tests).
    pub fn from_secret(secret: &[u8; SECRET_LEN]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self, Error> {
        let secret: &[u8; SECRET_LEN] = bytes.try_into().map_err(|_| Error::State {
            path: path.to_owned(),
            reason: format!(
                "the node secret is {} bytes, not {SECRET_LEN}; remove it to make a new one (the volume records it signed are then refused and the kubelet's republish takes the volumes over again)",
                bytes.len()
            ),
        })?;
        Ok(Self::from_secret(secret))
    }

    /// The tag of `content` for `purpose`, hex.
    pub fn sign(&self, purpose: Purpose, content: &[u8]) -> String {
        let mut context = hmac::Context::with_key(&self.key);
        context.update(purpose.label());
        context.update(content);
        hex(context.sign().as_ref())
    }

    /// Whether `tag_hex` is the tag of `content` for `purpose` (constant
    /// time).
    pub fn verify(&self, purpose: Purpose, content: &[u8], tag_hex: &str) -> bool {
        let Some(tag) = hex_decode(tag_hex) else {
            return false;
        };
        let mut message = Vec::with_capacity(purpose.label().len() + content.len());
        message.extend_from_slice(purpose.label());
        message.extend_from_slice(content);
        hmac::verify(&self.key, &message, &tag).is_ok()
    }
}

fn create_secret(path: &Path) -> Result<[u8; SECRET_LEN], Error> {
    let mut secret = [0u8; SECRET_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret).map_err(
        |_| Error::State {
            path: path.to_owned(),
            reason: "the system random number generator failed".into(),
        },
    )?;
    let tmp: PathBuf = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&tmp)
        .map_err(|e| Error::io("create node secret", &tmp, e))?;
    file.write_all(&secret)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io("write node secret", &tmp, e))?;
    drop(file);
    // A link fails if another start made the secret meanwhile: then that
    // one is the node's.
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(secret),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let bytes = fs::read(path).map_err(|e| Error::io("read node secret", path, e))?;
            bytes.try_into().map_err(|_| Error::State {
                path: path.to_owned(),
                reason: "the node secret made by another start is not 32 bytes".into(),
            })
        }
        Err(e) => Err(Error::io("create node secret", path, e)),
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn tags_bind_content_purpose_and_node() {
        let key = NodeKey::from_secret(&[7; 32]);
        let other_node = NodeKey::from_secret(&[8; 32]);
        let tag = key.sign(Purpose::VolumeRecord, b"record");
        let cases: &[(&NodeKey, Purpose, &[u8], &str, bool)] = &[
            (&key, Purpose::VolumeRecord, b"record", &tag, true),
            (&key, Purpose::VolumeRecord, b"recorD", &tag, false),
            (&key, Purpose::CaTrustBundle, b"record", &tag, false),
            (&other_node, Purpose::VolumeRecord, b"record", &tag, false),
            (&key, Purpose::VolumeRecord, b"record", "", false),
            (&key, Purpose::VolumeRecord, b"record", "zz", false),
            (&key, Purpose::VolumeRecord, b"record", &tag[..62], false),
        ];
        for (i, (key, purpose, content, tag, valid)) in cases.iter().enumerate() {
            assert_eq!(key.verify(*purpose, content, tag), *valid, "case {i}");
        }
    }

    #[test]
    fn the_secret_is_made_once_and_private() {
        let tmp = tempfile::tempdir().expect("tmp");
        let state = tmp.path().join("state");
        let first = NodeKey::load_or_create(&state).expect("create");
        let again = NodeKey::load_or_create(&state).expect("load");
        let tag = first.sign(Purpose::CaTrustBundle, b"x");
        assert!(again.verify(Purpose::CaTrustBundle, b"x", &tag));
        let mode = fs::metadata(state.join(NODE_SECRET_FILE))
            .expect("secret")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(fs::read_dir(&state).expect("list").count(), 1, "leftovers");
        fs::write(state.join(NODE_SECRET_FILE), b"short").expect("damage");
        let error = NodeKey::load_or_create(&state).expect_err("a damaged secret");
        assert!(error.to_string().contains("remove it"), "{error}");
    }
}
