//! Persisted per-volume metadata, so a restarted agent knows its volumes.
//!
//! One JSON file per volume under `<state-dir>/volumes/`, written to a
//! temporary name and renamed into place (atomic against a crash at any
//! instant). It holds no key and no token: keys live only on the volume's
//! tmpfs, tokens only in memory and only while they can still serve the
//! volume's next renewal (the kubelet re-sends them on republish).
//! Files are not fsynced: a power loss also empties every tmpfs volume, and
//! the kubelet then publishes them again.
//!
//! A record says where the agent mounts and writes, so each file carries an
//! HMAC under the node's key ([`NodeKey`]): a record this node's agent did
//! not write (crafted, edited, copied from another node, or from a credlet
//! before records were signed) is refused at start and moved aside, and
//! nothing is mounted for it. Its volume, if real, is taken over again by
//! the kubelet's next republish.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use credlet_ca::PodIdentity;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::node_key::{NodeKey, Purpose};
use crate::paths::VolumeId;

/// Current record format (2: signed).
pub const RECORD_VERSION: u32 = 2;

/// A record file: the record and the HMAC of its JSON encoding.
#[derive(Serialize, Deserialize)]
struct SignedRecord {
    record: VolumeRecord,
    mac: String,
}

/// What is remembered about one published volume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Format version.
    pub version: u32,
    /// The CSI volume id.
    pub volume_id: String,
    /// Where the volume is mounted.
    pub target_path: PathBuf,
    /// The pod it belongs to.
    pub pod: PodIdentity,
    /// The `credlet.io/` attributes as the kubelet sent them.
    pub attributes: BTreeMap<String, String>,
    /// The group the kubelet asked for (`volume_mount_group`).
    pub volume_mount_group: Option<u32>,
    /// The certificate currently in the volume, if one was written.
    pub certificate: Option<CertificateRecord>,
}

/// The certificate last written to a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateRecord {
    /// Serial, hex.
    pub serial_hex: String,
    /// notBefore, seconds since the epoch.
    pub not_before: u64,
    /// notAfter, seconds since the epoch.
    pub not_after: u64,
    /// Planned renewal, milliseconds since the epoch.
    pub renew_at_ms: u64,
}

/// A record that could not be loaded.
#[derive(Debug)]
pub struct BadRecord {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub reason: String,
}

/// The directory of volume records.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
    key: NodeKey,
}

impl StateStore {
    /// Opens (creating, mode 0700) `<state_dir>/volumes`, with the node key
    /// of `state_dir` (made on first use).
    pub fn open(state_dir: &Path) -> Result<Self, Error> {
        let key = NodeKey::load_or_create(state_dir)?;
        Self::open_with_key(state_dir, key)
    }

    /// Opens `<state_dir>/volumes` with a given node key.
    pub fn open_with_key(state_dir: &Path, key: NodeKey) -> Result<Self, Error> {
        let dir = state_dir.join("volumes");
        fs::create_dir_all(&dir).map_err(|e| Error::io("create state directory", &dir, e))?;
        let mut perms = fs::metadata(&dir)
            .map_err(|e| Error::io("stat state directory", &dir, e))?
            .permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o700);
        fs::set_permissions(&dir, perms)
            .map_err(|e| Error::io("chmod state directory", &dir, e))?;
        Ok(Self { dir, key })
    }

    fn path(&self, id: &VolumeId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes a record atomically (temporary file + rename), mode 0600.
    pub fn save(&self, id: &VolumeId, record: &VolumeRecord) -> Result<(), Error> {
        let path = self.path(id);
        let tmp = self.dir.join(format!("{id}.json.tmp"));
        let encode = |e: serde_json::Error| Error::State {
            path: path.clone(),
            reason: e.to_string(),
        };
        let content = serde_json::to_vec(record).map_err(encode)?;
        let body = serde_json::to_vec(&SignedRecord {
            record: record.clone(),
            mac: self.key.sign(Purpose::VolumeRecord, &content),
        })
        .map_err(encode)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&tmp)
            .map_err(|e| Error::io("write volume state", &tmp, e))?;
        file.write_all(&body)
            .map_err(|e| Error::io("write volume state", &tmp, e))?;
        drop(file);
        fs::rename(&tmp, &path).map_err(|e| Error::io("rename volume state", &path, e))
    }

    /// Removes a record (missing is fine).
    pub fn remove(&self, id: &VolumeId) -> Result<(), Error> {
        let path = self.path(id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove volume state", &path, e)),
        }
    }

    /// Loads every record. Temporary files of interrupted writes are
    /// removed; unreadable and unauthentic records are returned separately
    /// and moved aside (`.corrupt`) so they are reported once, not on every
    /// start.
    pub fn load_all(&self) -> Result<(Vec<VolumeRecord>, Vec<BadRecord>), Error> {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        let entries = fs::read_dir(&self.dir).map_err(|e| Error::io("list state", &self.dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list state", &self.dir, e))?;
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name.ends_with(".json.tmp") {
                let _ = fs::remove_file(&path);
                continue;
            }
            let Some(stem) = name.strip_suffix(".json") else {
                continue;
            };
            match self.load_one(&path, stem) {
                Ok(record) => good.push(record),
                Err(reason) => {
                    let _ = fs::rename(&path, path.with_extension("json.corrupt"));
                    bad.push(BadRecord { path, reason });
                }
            }
        }
        good.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
        Ok((good, bad))
    }

    fn load_one(&self, path: &Path, stem: &str) -> Result<VolumeRecord, String> {
        let body = fs::read(path).map_err(|e| e.to_string())?;
        let not_authentic = "not authentic: no valid HMAC under this node's key (not written by this node's agent, changed since, or from a credlet that did not sign records); nothing is mounted for it";
        let file: SignedRecord = serde_json::from_slice(&body).map_err(|e| {
            if serde_json::from_slice::<VolumeRecord>(&body).is_ok() {
                not_authentic.to_owned()
            } else {
                e.to_string()
            }
        })?;
        let content = serde_json::to_vec(&file.record).map_err(|e| e.to_string())?;
        if !self.key.verify(Purpose::VolumeRecord, &content, &file.mac) {
            return Err(not_authentic.to_owned());
        }
        let record = file.record;
        if record.version != RECORD_VERSION {
            return Err(format!("unknown record version {}", record.version));
        }
        if record.volume_id != stem {
            return Err("volume id does not match the file name".into());
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn record(id: &str) -> VolumeRecord {
        VolumeRecord {
            version: RECORD_VERSION,
            volume_id: id.into(),
            target_path: "/var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/c/mount".into(),
            pod: PodIdentity {
                namespace: "ns".into(),
                name: "p".into(),
                uid: "u".into(),
                service_account: "sa".into(),
            },
            attributes: BTreeMap::from([("credlet.io/duration".into(), "1h".into())]),
            volume_mount_group: Some(2000),
            certificate: Some(CertificateRecord {
                serial_hex: "01".into(),
                not_before: 1,
                not_after: 2,
                renew_at_ms: 3,
            }),
        }
    }

    #[test]
    fn round_trip_and_corruption() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = StateStore::open(tmp.path()).expect("open");
        let a = VolumeId::parse("csi-a").expect("id");
        let b = VolumeId::parse("csi-b").expect("id");
        store.save(&a, &record("csi-a")).expect("save");
        store.save(&b, &record("csi-b")).expect("save");
        let mode = fs::metadata(tmp.path().join("volumes/csi-a.json"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::write(tmp.path().join("volumes/csi-b.json"), b"{garbage").expect("corrupt");
        fs::write(tmp.path().join("volumes/csi-c.json.tmp"), b"partial").expect("tmp");
        let (good, bad) = store.load_all().expect("load");
        assert_eq!(good, vec![record("csi-a")]);
        assert_eq!(bad.len(), 1);
        assert!(!tmp.path().join("volumes/csi-c.json.tmp").exists());
        assert!(tmp.path().join("volumes/csi-b.json.corrupt").exists());
        store.remove(&a).expect("remove");
        store.remove(&a).expect("remove twice");
        assert!(store.load_all().expect("load").0.is_empty());
    }

    /// Only records this node's agent wrote, unchanged, are loaded; the
    /// rest are moved aside as not authentic.
    #[test]
    fn records_are_bound_to_the_node_key() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store =
            StateStore::open_with_key(tmp.path(), NodeKey::from_secret(&[1; 32])).expect("open");
        let a = VolumeId::parse("csi-a").expect("id");
        store.save(&a, &record("csi-a")).expect("save");
        let genuine = fs::read_to_string(tmp.path().join("volumes/csi-a.json")).expect("read");
        let other_node = tempfile::tempdir().expect("tmp");
        let foreign = StateStore::open_with_key(other_node.path(), NodeKey::from_secret(&[2; 32]))
            .expect("open");
        foreign.save(&a, &record("csi-a")).expect("save");
        let from_other_node =
            fs::read_to_string(other_node.path().join("volumes/csi-a.json")).expect("read");
        let unsigned = serde_json::to_string(&record("csi-a")).expect("json");
        let cases: &[(&str, String, bool)] = &[
            ("genuine", genuine.clone(), true),
            (
                "retargeted",
                genuine.replace("/var/lib/kubelet/pods/x/", "/var/lib/kubelet/pods/victim/"),
                false,
            ),
            ("another node's", from_other_node, false),
            ("unsigned", unsigned, false),
            (
                "bad tag",
                genuine.replace("\"mac\":\"", "\"mac\":\"00"),
                false,
            ),
        ];
        for (what, body, loaded) in cases {
            fs::write(tmp.path().join("volumes/csi-a.json"), body).expect("write");
            let (good, bad) = store.load_all().expect("load");
            assert_eq!(good.len() == 1, *loaded, "{what}");
            if !loaded {
                assert!(
                    bad[0].reason.contains("not authentic"),
                    "{what}: {}",
                    bad[0].reason
                );
                assert!(tmp.path().join("volumes/csi-a.json.corrupt").exists());
            }
        }
    }

    #[test]
    fn mismatched_id_is_rejected() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = StateStore::open(tmp.path()).expect("open");
        let a = VolumeId::parse("csi-a").expect("id");
        store.save(&a, &record("csi-other")).expect("save");
        let (good, bad) = store.load_all().expect("load");
        assert!(good.is_empty());
        assert_eq!(bad.len(), 1);
    }
}
