//! What the guard remembers, on disk and in memory: per image, how it came
//! to the node, which credentials were verified for it and which pods hold
//! a verification.
//!
//! Credentials are never stored, nor a plain hash of one: only an HMAC under
//! a node-local secret (generated on first start, 0600), which can not be
//! compared across nodes or brute-forced without the secret. Each record
//! file carries an HMAC over its content; a record that can not be read or
//! whose HMAC does not verify is dropped — it then counts as "no
//! verification" (fail closed). Files are written to a temporary name and
//! renamed (atomic), mode 0600.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::credential::Credential;
use crate::policy::Provenance;

/// Errors of the record store.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A filesystem operation failed.
    #[error("{op} {path:?}: {source}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The node secret file is not 32 bytes.
    #[error(
        "node secret {path:?} is corrupt ({len} bytes); remove it to generate a new one (all verifications are then redone)"
    )]
    BadSecret {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// The system random generator failed.
    #[error("the system random number generator failed")]
    Random,
}

fn io(op: &'static str, path: &Path, source: std::io::Error) -> RecordError {
    RecordError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// An HMAC of a credential (or `anonymous`), hex. Safe to store and log.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CredentialId(String);

impl CredentialId {
    /// The id of "no credentials".
    pub fn anonymous() -> Self {
        Self("anonymous".into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A pod's verification of an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Grant {
    /// Which credential proved access.
    pub credential: CredentialId,
    /// When, seconds since the epoch.
    pub verified_at: u64,
}

/// Everything known about one image (keyed by the runtime's image id).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageRecord {
    /// The runtime's image id (`sha256:…` of the config).
    pub image_id: String,
    /// How it came to the node.
    pub provenance: Provenance,
    /// Normalized repository names it was pulled or verified as.
    pub repositories: BTreeSet<String>,
    /// Credentials verified for it, with the time of the last success.
    pub verified: BTreeMap<CredentialId, u64>,
    /// Pods holding a verification.
    pub grants: BTreeMap<String, Grant>,
}

impl ImageRecord {
    /// A record for a freshly seen image.
    pub fn new(image_id: &str, provenance: Provenance) -> Self {
        Self {
            image_id: image_id.to_owned(),
            provenance,
            repositories: BTreeSet::new(),
            verified: BTreeMap::new(),
            grants: BTreeMap::new(),
        }
    }

    /// Whether `credential` was verified within `ttl` of `now`.
    pub fn credential_verified(
        &self,
        credential: &CredentialId,
        ttl: Duration,
        now: SystemTime,
    ) -> bool {
        self.verified
            .get(credential)
            .is_some_and(|at| fresh(*at, ttl, now))
    }

    /// The pod's grant, if still within `ttl`.
    pub fn valid_grant(&self, pod_uid: &str, ttl: Duration, now: SystemTime) -> Option<&Grant> {
        self.grants
            .get(pod_uid)
            .filter(|g| fresh(g.verified_at, ttl, now))
    }
}

fn fresh(at: u64, ttl: Duration, now: SystemTime) -> bool {
    let now = unix(now);
    at <= now.saturating_add(60) && now.saturating_sub(at) < ttl.as_secs()
}

/// Seconds since the epoch.
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[derive(Serialize, Deserialize)]
struct SignedFile {
    record: ImageRecord,
    mac: String,
}

/// Image records: loaded at start, kept in memory (sharded map).
///
/// A new record is written through before the call that created it is
/// answered: an image whose record is lost would look preloaded. Later
/// changes (verifications, grants) are written behind, coalesced within
/// [`FLUSH_DELAY`], off the request path; losing them in a crash only means
/// the pods prove access again. Dropping the store flushes what is pending.
#[derive(Debug)]
pub struct RecordStore {
    dir: PathBuf,
    key: hmac::Key,
    records: DashMap<String, ImageRecord>,
    /// Records changed in memory and not yet on disk.
    dirty: Mutex<HashSet<String>>,
    /// A delayed flush is on its way.
    flush_scheduled: AtomicBool,
    /// One flush at a time, so an older copy never overwrites a newer one.
    flushing: Mutex<()>,
}

/// How long changes are collected before they are written.
pub const FLUSH_DELAY: Duration = Duration::from_millis(20);

/// Whether [`RecordStore::update`] changed anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Nothing changed; no I/O.
    Unchanged,
    /// A new record, written through.
    Created,
    /// Changed in memory; written behind.
    Deferred,
}

const SECRET_LEN: usize = 32;

impl RecordStore {
    /// Opens `<state_dir>/imageguard`: the node secret (created on first
    /// start) and every readable, authentic record. Returns how many
    /// records were dropped as unreadable or tampered with.
    pub fn open(state_dir: &Path) -> Result<(Self, usize), RecordError> {
        let dir = state_dir.join("imageguard");
        let records_dir = dir.join("images");
        fs::create_dir_all(&records_dir).map_err(|e| io("create", &records_dir, e))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| io("chmod", &dir, e))?;
        let secret = load_or_create_secret(&dir.join("node-secret"))?;
        let key = hmac::Key::new(hmac::HMAC_SHA256, &secret);
        let store = Self {
            dir: records_dir,
            key,
            records: DashMap::new(),
            dirty: Mutex::new(HashSet::new()),
            flush_scheduled: AtomicBool::new(false),
            flushing: Mutex::new(()),
        };
        let dropped = store.load()?;
        Ok((store, dropped))
    }

    fn load(&self) -> Result<usize, RecordError> {
        let mut dropped = 0;
        let entries = fs::read_dir(&self.dir).map_err(|e| io("list", &self.dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io("list", &self.dir, e))?;
            let path = entry.path();
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(&path);
                continue;
            }
            match self.read_one(&path) {
                Some(record) if file_name(&record.image_id) == name => {
                    self.records.insert(record.image_id.clone(), record);
                }
                _ => {
                    dropped += 1;
                    let _ = fs::remove_file(&path);
                    // Fail closed: an image whose record is lost must not
                    // look preloaded (unprotected under the default
                    // policy). Keep it as private with no verifications, so
                    // every pod proves access again.
                    match image_id_of(name) {
                        Some(image_id) => {
                            tracing::warn!(path = %path.display(), image_id, "image record unreadable or not authentic; kept as private with no verifications");
                            let record = ImageRecord::new(&image_id, Provenance::Credentials);
                            self.write(&record)?;
                            self.records.insert(image_id, record);
                        }
                        None => {
                            tracing::warn!(path = %path.display(), "unreadable file in the image records dropped");
                        }
                    }
                }
            }
        }
        Ok(dropped)
    }

    fn read_one(&self, path: &Path) -> Option<ImageRecord> {
        let body = fs::read(path).ok()?;
        let file: SignedFile = serde_json::from_slice(&body).ok()?;
        let content = serde_json::to_vec(&file.record).ok()?;
        let mac = hex_decode(&file.mac)?;
        hmac::verify(&self.key, &content, &mac).ok()?;
        Some(file.record)
    }

    /// The HMAC id of a credential (`None`: anonymous).
    pub fn credential_id(&self, credential: Option<&Credential>) -> CredentialId {
        match credential {
            None => CredentialId::anonymous(),
            Some(c) => {
                let bytes = c.canonical_bytes();
                let tag = hmac::sign(&self.key, &bytes);
                CredentialId(hex(tag.as_ref()))
            }
        }
    }

    /// A copy of the record of `image_id`.
    pub fn get(&self, image_id: &str) -> Option<ImageRecord> {
        self.records.get(image_id).map(|r| r.clone())
    }

    /// Reads the record of `image_id` without copying it.
    pub fn with<T>(&self, image_id: &str, f: impl FnOnce(Option<&ImageRecord>) -> T) -> T {
        match self.records.get(image_id) {
            Some(r) => f(Some(r.value())),
            None => f(None),
        }
    }

    /// Changes (or creates, with `provenance`) the record of `image_id`.
    /// A new record is written through; a changed one is written behind
    /// (see [`RecordStore::schedule_flush`]); a decision that changes
    /// nothing costs no I/O.
    pub fn update(
        &self,
        image_id: &str,
        provenance: Provenance,
        change: impl FnOnce(&mut ImageRecord) -> bool,
    ) -> Result<Stored, RecordError> {
        let mut created = false;
        let mut entry = self.records.entry(image_id.to_owned()).or_insert_with(|| {
            created = true;
            ImageRecord::new(image_id, provenance)
        });
        let changed = change(entry.value_mut());
        if created {
            // Under the entry's lock: no later change can be overtaken.
            if let Err(error) = self.write(entry.value()) {
                drop(entry);
                self.records.remove(image_id);
                return Err(error);
            }
            return Ok(Stored::Created);
        }
        drop(entry);
        if !changed {
            return Ok(Stored::Unchanged);
        }
        lock(&self.dirty).insert(image_id.to_owned());
        Ok(Stored::Deferred)
    }

    /// Arranges for pending changes to be written within [`FLUSH_DELAY`],
    /// on the blocking pool; without a Tokio runtime, writes them now.
    pub fn schedule_flush(self: &Arc<Self>) {
        if self.flush_scheduled.swap(true, AtomicOrdering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.flush_scheduled.store(false, AtomicOrdering::Release);
            self.flush_logged();
            return;
        };
        // A weak handle: a store dropped meanwhile has flushed on drop.
        let store = Arc::downgrade(self);
        runtime.spawn(async move {
            tokio::time::sleep(FLUSH_DELAY).await;
            let Some(store) = store.upgrade() else { return };
            store.flush_scheduled.store(false, AtomicOrdering::Release);
            let _ = tokio::task::spawn_blocking(move || store.flush_logged()).await;
        });
    }

    /// Writes every record changed in memory. Returns how many were
    /// written; on an error the unwritten ones stay pending.
    pub fn flush(&self) -> Result<usize, RecordError> {
        let _one_at_a_time = lock(&self.flushing);
        let pending: Vec<String> = lock(&self.dirty).drain().collect();
        let mut written = 0;
        for (i, image_id) in pending.iter().enumerate() {
            let Some(record) = self.get(image_id) else {
                continue; // pruned meanwhile
            };
            if let Err(error) = self.write(&record) {
                lock(&self.dirty).extend(pending[i..].iter().cloned());
                return Err(error);
            }
            written += 1;
        }
        Ok(written)
    }

    fn flush_logged(&self) {
        if let Err(error) = self.flush() {
            tracing::error!(%error, "writing image records; retried with the next change");
        }
    }

    /// Records changed in memory and not yet written.
    pub fn pending(&self) -> usize {
        lock(&self.dirty).len()
    }

    fn write(&self, record: &ImageRecord) -> Result<(), RecordError> {
        let content = serde_json::to_vec(record).map_err(|e| io("encode", &self.dir, e.into()))?;
        let mac = hex(hmac::sign(&self.key, &content).as_ref());
        let body = serde_json::to_vec(&SignedFile {
            record: record.clone(),
            mac,
        })
        .map_err(|e| io("encode", &self.dir, e.into()))?;
        let path = self.dir.join(file_name(&record.image_id));
        let tmp = path.with_extension("tmp");
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io("write", &tmp, e))?;
        file.write_all(&body).map_err(|e| io("write", &tmp, e))?;
        drop(file);
        fs::rename(&tmp, &path).map_err(|e| io("rename", &path, e))
    }

    /// Drops records of images no longer on the node and grants of pods
    /// no longer on it. Returns (images removed, grants removed).
    pub fn prune(
        &self,
        present_images: &HashSet<String>,
        live_pods: Option<&HashSet<String>>,
    ) -> Result<(usize, usize), RecordError> {
        let gone: Vec<String> = self
            .records
            .iter()
            .filter(|r| !present_images.contains(r.key()))
            .map(|r| r.key().clone())
            .collect();
        for id in &gone {
            self.records.remove(id);
            let path = self.dir.join(file_name(id));
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove", &path, e)),
            }
        }
        let mut grants_removed = 0;
        if let Some(live) = live_pods {
            let ids: Vec<String> = self.records.iter().map(|r| r.key().clone()).collect();
            for id in ids {
                if let Some(mut record) = self.records.get_mut(&id) {
                    let before = record.grants.len();
                    record.grants.retain(|uid, _| live.contains(uid));
                    if record.grants.len() != before {
                        grants_removed += before - record.grants.len();
                        self.write(record.value())?;
                    }
                }
            }
        }
        Ok((gone.len(), grants_removed))
    }

    /// Number of image records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

impl Drop for RecordStore {
    fn drop(&mut self) {
        self.flush_logged();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `sha256:abc…` → `sha256-abc….json` (ids are digests; anything else is
/// hex-encoded so it can not escape the directory).
fn file_name(image_id: &str) -> String {
    let safe = image_id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b':' || b == b'-' || b == b'.' || b == b'_')
        && !image_id.starts_with('.')
        && !image_id.is_empty()
        && image_id.len() <= 200;
    if safe {
        format!("{}.json", image_id.replace(':', "-"))
    } else {
        format!("x-{}.json", hex(image_id.as_bytes()))
    }
}

/// The image id a record file name stands for (`sha256-<hex>.json`).
fn image_id_of(file_name: &str) -> Option<String> {
    let stem = file_name.strip_suffix(".json")?;
    let (algorithm, hex) = stem.split_once('-')?;
    let valid = matches!(algorithm, "sha256" | "sha384" | "sha512")
        && !hex.is_empty()
        && hex.bytes().all(|b| b.is_ascii_hexdigit());
    valid.then(|| format!("{algorithm}:{hex}"))
}

fn load_or_create_secret(path: &Path) -> Result<[u8; SECRET_LEN], RecordError> {
    match fs::read(path) {
        Ok(bytes) => {
            let len = bytes.len();
            bytes.try_into().map_err(|_| RecordError::BadSecret {
                path: path.to_owned(),
                len,
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = [0u8; SECRET_LEN];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
                .map_err(|_| RecordError::Random)?;
            let tmp = path.with_extension("tmp");
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| io("create node secret", &tmp, e))?;
            file.write_all(&secret)
                .and_then(|()| file.sync_all())
                .map_err(|e| io("write node secret", &tmp, e))?;
            fs::rename(&tmp, path).map_err(|e| io("create node secret", path, e))?;
            Ok(secret)
        }
        Err(e) => Err(io("read node secret", path, e)),
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
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
    use super::*;

    const ID: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn grant(store: &RecordStore) {
        store
            .update(ID, Provenance::Credentials, |r| {
                r.repositories.insert("registry.example/team/app".into());
                r.verified
                    .insert(CredentialId("c1".into()), unix(SystemTime::now()));
                r.grants.insert(
                    "pod-1".into(),
                    Grant {
                        credential: CredentialId("c1".into()),
                        verified_at: unix(SystemTime::now()),
                    },
                );
                true
            })
            .expect("update");
    }

    fn on_disk(tmp: &Path) -> Option<ImageRecord> {
        let (store, _) = RecordStore::open(tmp).expect("reopen");
        let record = store.get(ID);
        std::mem::forget(store); // no flush on drop: what is on disk now
        record
    }

    #[test]
    fn new_records_are_written_through_changes_behind() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (store, _) = RecordStore::open(tmp.path()).expect("open");
        let created = store
            .update(ID, Provenance::Credentials, |_| false)
            .expect("create");
        assert_eq!(created, Stored::Created);
        let written = on_disk(tmp.path()).expect("a new record is on disk at once");
        assert!(written.grants.is_empty());

        let unchanged = store
            .update(ID, Provenance::Credentials, |_| false)
            .expect("no change");
        assert_eq!(unchanged, Stored::Unchanged);
        assert_eq!(store.pending(), 0);

        let store = Arc::new(store);
        let changed = store
            .update(ID, Provenance::Credentials, |r| {
                r.grants.insert(
                    "pod-1".into(),
                    Grant {
                        credential: CredentialId("c1".into()),
                        verified_at: 1,
                    },
                );
                true
            })
            .expect("change");
        assert_eq!(changed, Stored::Deferred);
        assert_eq!(store.pending(), 1);
        assert!(
            on_disk(tmp.path()).expect("record").grants.is_empty(),
            "a change waits for the flush"
        );
        assert_eq!(store.flush().expect("flush"), 1);
        assert_eq!(store.pending(), 0);
        assert_eq!(on_disk(tmp.path()).expect("record").grants.len(), 1);

        // Dropping the store writes what is pending.
        store
            .update(ID, Provenance::Credentials, |r| {
                r.verified.insert(CredentialId("c2".into()), 2);
                true
            })
            .expect("change");
        drop(store);
        assert_eq!(on_disk(tmp.path()).expect("record").verified.len(), 1);
    }

    #[tokio::test]
    async fn scheduled_flush_writes_within_the_delay() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = Arc::new(RecordStore::open(tmp.path()).expect("open").0);
        store
            .update(ID, Provenance::Credentials, |_| true)
            .expect("create");
        for pod in 0..50 {
            let stored = store
                .update(ID, Provenance::Credentials, |r| {
                    r.grants.insert(
                        format!("pod-{pod}"),
                        Grant {
                            credential: CredentialId("c1".into()),
                            verified_at: 1,
                        },
                    );
                    true
                })
                .expect("change");
            assert_eq!(stored, Stored::Deferred);
            store.schedule_flush();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while store.pending() > 0 {
            assert!(std::time::Instant::now() < deadline, "flushed in time");
            tokio::time::sleep(FLUSH_DELAY).await;
        }
        // A flush in progress holds the flush lock: this one waits for it
        // and finds nothing left to write.
        assert_eq!(store.flush().expect("flush"), 0);
        assert_eq!(on_disk(tmp.path()).expect("record").grants.len(), 50);
    }

    #[test]
    fn survives_restart_and_is_private() {
        let tmp = tempfile::tempdir().expect("tmp");
        {
            let (store, dropped) = RecordStore::open(tmp.path()).expect("open");
            assert_eq!(dropped, 0);
            grant(&store);
        }
        let (store, dropped) = RecordStore::open(tmp.path()).expect("reopen");
        assert_eq!(dropped, 0);
        let record = store.get(ID).expect("record");
        assert!(
            record
                .valid_grant("pod-1", Duration::from_secs(60), SystemTime::now())
                .is_some()
        );
        let secret = tmp.path().join("imageguard/node-secret");
        assert_eq!(
            fs::metadata(&secret).expect("secret").permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read(&secret).expect("secret").len(), 32);
        let file = tmp.path().join("imageguard/images").join(file_name(ID));
        assert_eq!(
            fs::metadata(&file).expect("file").permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn tampered_or_corrupt_records_fail_closed() {
        let tmp = tempfile::tempdir().expect("tmp");
        {
            let (store, _) = RecordStore::open(tmp.path()).expect("open");
            grant(&store);
        }
        let file = tmp.path().join("imageguard/images").join(file_name(ID));
        let text = fs::read_to_string(&file).expect("read");
        fs::write(&file, text.replace("pod-1", "pod-2")).expect("tamper");
        let (store, dropped) = RecordStore::open(tmp.path()).expect("reopen");
        assert_eq!(dropped, 1);
        // Kept as private with nothing verified: fail closed, not open.
        let kept = store.get(ID).expect("tombstone");
        assert_eq!(kept.provenance, Provenance::Credentials);
        assert!(kept.grants.is_empty() && kept.verified.is_empty());
        drop(store);
        // The tombstone itself is authentic on the next start.
        let (store, dropped) = RecordStore::open(tmp.path()).expect("reopen");
        assert_eq!(dropped, 0);
        assert!(store.get(ID).is_some());
        drop(store);

        let (store, _) = RecordStore::open(tmp.path()).expect("open");
        grant(&store);
        drop(store);
        fs::write(&file, b"{\"record\":").expect("truncate");
        let (store, dropped) = RecordStore::open(tmp.path()).expect("reopen");
        assert_eq!(dropped, 1);
        assert!(store.get(ID).expect("tombstone").grants.is_empty());
        // A stray file that names no image is just dropped.
        fs::write(tmp.path().join("imageguard/images/junk.json"), b"x").expect("junk");
        drop(store);
        let (store, dropped) = RecordStore::open(tmp.path()).expect("reopen");
        assert_eq!(dropped, 1);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn ttl_and_prune() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (store, _) = RecordStore::open(tmp.path()).expect("open");
        grant(&store);
        let record = store.get(ID).expect("record");
        let later = SystemTime::now() + Duration::from_secs(3600);
        assert!(
            record
                .valid_grant("pod-1", Duration::from_secs(60), later)
                .is_none()
        );
        assert!(record.credential_verified(
            &CredentialId("c1".into()),
            Duration::from_secs(7200),
            later
        ));
        assert!(!record.credential_verified(
            &CredentialId("c2".into()),
            Duration::from_secs(7200),
            later
        ));

        let present: HashSet<String> = [ID.to_owned()].into();
        let live: HashSet<String> = HashSet::new();
        assert_eq!(store.prune(&present, Some(&live)).expect("prune"), (0, 1));
        assert!(store.get(ID).expect("kept").grants.is_empty());
        assert_eq!(store.prune(&HashSet::new(), None).expect("prune"), (1, 0));
        assert!(store.is_empty());
        assert_eq!(
            fs::read_dir(tmp.path().join("imageguard/images"))
                .expect("ls")
                .count(),
            0
        );
    }

    #[test]
    fn file_names_cannot_escape() {
        assert_eq!(file_name("sha256:ab"), "sha256-ab.json");
        assert!(file_name("../../etc/passwd").starts_with("x-"));
        assert!(!file_name("a/b").contains('/'));
    }
}
