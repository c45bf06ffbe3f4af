//! What the guard remembers, on disk and in memory: per image, how it came
//! to the node, which credentials were verified for it and which pods hold
//! a verification.
//!
//! Credentials are never stored, nor a plain hash of one: only an HMAC under
//! a node-local secret (generated on first start, 0600), which can not be
//! compared across nodes or brute-forced without the secret. Each file
//! carries an HMAC over its content; a record that can not be read or whose
//! HMAC does not verify is dropped — it then counts as "no verification"
//! (fail closed). Files are written to a temporary name and renamed
//! (atomic), mode 0600.
//!
//! One record is several files, so that writing one verification costs the
//! same with ten pods on the node or ten thousand: the image's *head*
//! (`images/<id>.json`: provenance, repositories) and one small file per
//! entry under `images/<id>.d/` — a pod's grant (`g-<uid>.json`) or a
//! credential's last verification (`v-<credential>.json`). Each entry's
//! HMAC covers the image id and its key, so an entry moved to another image
//! or renamed does not verify. Entries count only beside an authentic head;
//! one entry that does not verify drops the whole record (private, no
//! verifications), like a head that does not. A record of the earlier
//! single-file format (entries inside the head) is read and rewritten in
//! this layout once, at open.
//!
//! An image without a record looks preloaded, which the default policy does
//! not protect. So a record must never go missing for an image the guard
//! saw pulled with credentials:
//!
//! - before a credentialed pull of an absent image is sent to the runtime,
//!   a *pull intent* (the reference) is written to `pulling/`; if it can not
//!   be, the pull is refused before anything is downloaded. The intent is
//!   removed once the image's record is on disk. An intent left over from a
//!   previous run (a crash, or a record that could not be written) marks the
//!   image it produced as private;
//! - the *inventory* (`inventory.json`) lists every image that has a record;
//!   it is written before a new record's file. A listed image whose record
//!   file is gone or corrupt comes back as private with no verifications;
//! - a record that could not be written stays in memory (protected while
//!   the process runs) and is retried with every flush.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::credential::Credential;
use crate::policy::Provenance;
use crate::reference::ImageRef;
use crate::resolve::pulled_as;

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

/// A map of a record whose entries are files of their own: it remembers
/// which keys changed since they were last written, so that writing one
/// entry does not rewrite the others. Reads go through [`Deref`] to the
/// map.
///
/// [`Deref`]: std::ops::Deref
#[derive(Clone, Debug)]
pub struct Entries<K, V> {
    map: BTreeMap<K, V>,
    /// Keys set or removed and not written since.
    changed: BTreeSet<K>,
}

impl<K: Ord, V> Default for Entries<K, V> {
    fn default() -> Self {
        Self {
            map: BTreeMap::new(),
            changed: BTreeSet::new(),
        }
    }
}

impl<K: Ord, V: PartialEq> PartialEq for Entries<K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map
    }
}

impl<K: Ord, V: Eq> Eq for Entries<K, V> {}

impl<K, V> std::ops::Deref for Entries<K, V> {
    type Target = BTreeMap<K, V>;

    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl<K: Ord + Clone, V: PartialEq> Entries<K, V> {
    /// Sets `key` (to be written if the value is new).
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        if self.map.get(&key) != Some(&value) {
            self.changed.insert(key.clone());
        }
        self.map.insert(key, value)
    }

    /// Removes `key` (its file with it).
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let removed = self.map.remove(key);
        if removed.is_some() {
            self.changed.insert(key.clone());
        }
        removed
    }

    /// Keeps the entries for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) {
        let changed = &mut self.changed;
        self.map.retain(|key, value| {
            let kept = keep(key, value);
            if !kept {
                changed.insert(key.clone());
            }
            kept
        });
    }

    /// Marks every key changed (a record to be written whole).
    fn mark_all(&mut self) {
        self.changed.extend(self.map.keys().cloned());
    }

    /// The changed keys and their values now (`None`: removed), no longer
    /// marked.
    fn take_changed(&mut self) -> Vec<(K, Option<V>)>
    where
        V: Clone,
    {
        std::mem::take(&mut self.changed)
            .into_iter()
            .map(|key| {
                let value = self.map.get(&key).cloned();
                (key, value)
            })
            .collect()
    }

    /// Marks keys changed again (their write failed).
    fn remark(&mut self, keys: impl IntoIterator<Item = K>) {
        self.changed.extend(keys);
    }
}

/// Everything known about one image (keyed by the runtime's image id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRecord {
    /// The runtime's image id (`sha256:…` of the config).
    pub image_id: String,
    /// How it came to the node.
    pub provenance: Provenance,
    /// The repositories credlet knows the image by, normalized: the one a
    /// pull that brought the image to the node was made from, or (for an
    /// image first met on the node) the ones it carried then. Credentials
    /// are checked, and public answers asked again, only against these:
    /// never against a name a caller brings, as containerd gives a pull of
    /// any name whose manifest is this image the cached image without
    /// downloading anything.
    pub repositories: BTreeSet<String>,
    /// Credentials verified for it, with the time of the last success.
    pub verified: Entries<CredentialId, u64>,
    /// Pods holding a verification.
    pub grants: Entries<String, Grant>,
}

impl ImageRecord {
    /// A record for a freshly seen image.
    pub fn new(image_id: &str, provenance: Provenance) -> Self {
        Self {
            image_id: image_id.to_owned(),
            provenance,
            repositories: BTreeSet::new(),
            verified: Entries::default(),
            grants: Entries::default(),
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

    /// The provenance to decide by at `now`. An image counts as public only
    /// while its last anonymous success is within `ttl`, like any positive
    /// answer: a repository can turn private, and a public answer must not
    /// hold for every pod and policy forever. Past that it is private until
    /// an anonymous check succeeds again.
    pub fn effective_provenance(&self, ttl: Duration, now: SystemTime) -> Provenance {
        match self.provenance {
            Provenance::Anonymous
                if self.credential_verified(&CredentialId::anonymous(), ttl, now) =>
            {
                Provenance::Anonymous
            }
            _ => Provenance::Credentials,
        }
    }

    /// Whether the record says the image is public but that answer is older
    /// than `ttl` (it must be checked again).
    pub fn public_answer_expired(&self, ttl: Duration, now: SystemTime) -> bool {
        self.provenance == Provenance::Anonymous
            && self.effective_provenance(ttl, now) != Provenance::Anonymous
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

/// A record in the single-file format of earlier versions (read once, at
/// open, and rewritten as a head and entries). Its HMAC is over exactly
/// this serialization.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LegacyRecord {
    image_id: String,
    provenance: Provenance,
    repositories: BTreeSet<String>,
    verified: BTreeMap<CredentialId, u64>,
    grants: BTreeMap<String, Grant>,
}

#[derive(Serialize, Deserialize)]
struct LegacyFile {
    record: LegacyRecord,
    mac: String,
}

/// What a record's head file holds: the image-wide facts, rarely changed.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Head {
    image_id: String,
    provenance: Provenance,
    repositories: BTreeSet<String>,
}

impl Head {
    fn of(record: &ImageRecord) -> Self {
        Self {
            image_id: record.image_id.clone(),
            provenance: record.provenance,
            repositories: record.repositories.clone(),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct SignedHead {
    head: Head,
    mac: String,
}

/// One entry of a record, bound to its image by the HMAC.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    image_id: String,
    #[serde(flatten)]
    value: EntryValue,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
enum EntryValue {
    /// A pod's grant.
    Grant { pod: String, grant: Grant },
    /// A credential's last verification.
    Verified { credential: CredentialId, at: u64 },
}

#[derive(Serialize, Deserialize)]
struct SignedEntry {
    entry: Entry,
    mac: String,
}

/// HMAC domains: a head, an entry and a legacy record can never be taken
/// for one another, whatever their JSON.
const HEAD_DOMAIN: &[u8] = b"credlet imageguard head v2\0";
const ENTRY_DOMAIN: &[u8] = b"credlet imageguard entry v2\0";

/// The ids of every image with a record.
#[derive(Serialize, Deserialize)]
struct Inventory {
    images: BTreeSet<String>,
}

#[derive(Serialize, Deserialize)]
struct SignedInventory {
    inventory: Inventory,
    mac: String,
}

/// A pull on its way to the runtime.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Intent {
    /// The normalized reference pulled.
    reference: String,
    /// When the pull started, seconds since the epoch.
    started: u64,
}

#[derive(Serialize, Deserialize)]
struct SignedIntent {
    intent: Intent,
    mac: String,
}

/// A pull intent on disk (see [`RecordStore::begin_pull`]): ends with
/// [`RecordStore::end_pull`], or stays on disk when the pull's record could
/// not be written. Dropped unended (the caller went away while the runtime
/// pulled), it counts as a stale intent at once: whatever image that pull
/// brings is private.
#[derive(Debug)]
#[must_use = "end the pull intent, or it stays on disk as a stale one"]
pub struct PullIntent {
    path: PathBuf,
    reference: ImageRef,
    /// The store's stale intents, to join on drop; `None` once ended.
    stale: Option<Arc<Mutex<Vec<StaleIntent>>>>,
}

impl PullIntent {
    /// Ends the intent without leaving it stale; returns its file.
    fn end(mut self) -> PathBuf {
        self.stale = None;
        std::mem::take(&mut self.path)
    }
}

impl Drop for PullIntent {
    fn drop(&mut self) {
        if let Some(stale) = self.stale.take() {
            lock(&stale).push(StaleIntent {
                path: std::mem::take(&mut self.path),
                reference: self.reference.clone(),
            });
        }
    }
}

/// An intent left by an earlier pull whose record is not known to be on
/// disk: the image it produced, if any, is private.
#[derive(Debug, Clone)]
struct StaleIntent {
    path: PathBuf,
    reference: ImageRef,
}

/// Image records: loaded at start, kept in memory (sharded map).
///
/// A new record is on disk (files and inventory entry) before the call that
/// created it is answered with success — [`RecordStore::persist`]; until
/// then it is kept in memory and retried. Later changes (verifications,
/// grants) are written behind, coalesced within [`FLUSH_DELAY`], off the
/// request path, each changed entry as its own small file; losing them in
/// a crash only means the pods prove access again. Dropping the store
/// flushes what is pending.
#[derive(Debug)]
pub struct RecordStore {
    dir: PathBuf,
    inventory_path: PathBuf,
    intents_dir: PathBuf,
    key: hmac::Key,
    records: DashMap<String, ImageRecord>,
    /// Records changed in memory and not yet on disk, and whether their
    /// head changed (their changed entries are marked in the record).
    dirty: Mutex<HashMap<String, bool>>,
    /// Records whose file or inventory entry is not on disk yet.
    unwritten: Mutex<HashSet<String>>,
    /// The ids the inventory on disk lists.
    inventory: Mutex<BTreeSet<String>>,
    /// Intents of pulls whose record is not on disk yet, by image id.
    intents_by_image: Mutex<HashMap<String, Vec<PathBuf>>>,
    /// Intents from earlier runs (or of pulls whose caller went away), not
    /// matched to an image yet.
    stale_intents: Arc<Mutex<Vec<StaleIntent>>>,
    /// Counts record changes; see [`RecordStore::generation`].
    generation: AtomicU64,
    /// The generation of each record's last change.
    touched: DashMap<String, u64>,
    /// A delayed flush is on its way.
    flush_scheduled: AtomicBool,
    /// One writer at a time, so an older copy never overwrites a newer one:
    /// every record, inventory and intent write holds it, and copies what
    /// it writes only once it holds it.
    io: Mutex<()>,
}

/// How long changes are collected before they are written.
pub const FLUSH_DELAY: Duration = Duration::from_millis(20);

/// Whether [`RecordStore::update`] (or [`RecordStore::change`]) changed
/// anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Nothing changed; no I/O.
    Unchanged,
    /// A new record: written through by [`RecordStore::update`]; after
    /// [`RecordStore::change`] the caller must [`RecordStore::persist`] it.
    Created,
    /// Changed in memory; written behind.
    Deferred,
}

const SECRET_LEN: usize = 32;

/// How many of [`RecordStore::open`]'s findings failed closed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// Record files dropped as unreadable or not authentic.
    pub dropped: usize,
    /// Images the inventory lists whose record file is gone.
    pub missing: usize,
    /// Pull intents left by an earlier run.
    pub stale_intents: usize,
    /// Records of the earlier single-file format, rewritten as a head and
    /// entries.
    pub migrated: usize,
}

impl RecordStore {
    /// Opens `<state_dir>/imageguard`: the node secret (created on first
    /// start) and every readable, authentic record. Returns how many
    /// records were dropped as unreadable, tampered with or missing (each
    /// kept as private with no verifications).
    pub fn open(state_dir: &Path) -> Result<(Self, usize), RecordError> {
        let (store, opened) = Self::open_report(state_dir)?;
        Ok((store, opened.dropped + opened.missing))
    }

    /// [`RecordStore::open`] with the details.
    pub fn open_report(state_dir: &Path) -> Result<(Self, Opened), RecordError> {
        let dir = state_dir.join("imageguard");
        let records_dir = dir.join("images");
        let intents_dir = dir.join("pulling");
        for d in [&records_dir, &intents_dir] {
            fs::create_dir_all(d).map_err(|e| io("create", d, e))?;
        }
        // No chmod when the mode is right: a read-only records directory
        // must not keep the guard from starting (it then refuses what it
        // can not record).
        let mode = fs::metadata(&dir).map_err(|e| io("stat", &dir, e))?;
        if mode.permissions().mode() & 0o777 != 0o700 {
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                .map_err(|e| io("chmod", &dir, e))?;
        }
        let secret = load_or_create_secret(&dir.join("node-secret"))?;
        let key = hmac::Key::new(hmac::HMAC_SHA256, &secret);
        let store = Self {
            dir: records_dir,
            inventory_path: dir.join("inventory.json"),
            intents_dir,
            key,
            records: DashMap::new(),
            dirty: Mutex::new(HashMap::new()),
            unwritten: Mutex::new(HashSet::new()),
            inventory: Mutex::new(BTreeSet::new()),
            intents_by_image: Mutex::new(HashMap::new()),
            stale_intents: Arc::new(Mutex::new(Vec::new())),
            generation: AtomicU64::new(0),
            touched: DashMap::new(),
            flush_scheduled: AtomicBool::new(false),
            io: Mutex::new(()),
        };
        let (dropped, migrated) = store.load()?;
        let mut opened = Opened {
            dropped,
            migrated,
            ..Opened::default()
        };
        if migrated > 0 {
            tracing::info!(
                migrated,
                "image records of the single-file format rewritten as one file per entry"
            );
        }
        opened.missing = store.load_inventory();
        opened.stale_intents = store.load_intents();
        // Tombstones and a rebuilt inventory are written now if the disk
        // lets us; otherwise they stay in memory and are retried.
        if let Err(error) = store.flush() {
            tracing::error!(%error, "writing image records at start; retried with the next change");
        }
        Ok((store, opened))
    }

    /// Loads every record: heads (either format) first, then the entries
    /// beside authentic heads. Returns (records dropped, legacy records to
    /// rewrite).
    fn load(&self) -> Result<(usize, usize), RecordError> {
        let mut dropped = 0;
        let mut legacy_ids = Vec::new();
        let mut entry_dirs: Vec<(String, PathBuf)> = Vec::new();
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
            if let Some(stem) = name.strip_suffix(".d")
                && entry.file_type().is_ok_and(|t| t.is_dir())
            {
                entry_dirs.push((stem.to_owned(), path));
                continue;
            }
            match self.read_head(&path) {
                Some((record, legacy)) if file_name(&record.image_id) == name => {
                    if legacy {
                        legacy_ids.push(record.image_id.clone());
                    }
                    self.records.insert(record.image_id.clone(), record);
                }
                _ => {
                    dropped += 1;
                    // Fail closed: an image whose record is lost must not
                    // look preloaded (unprotected under the default
                    // policy). Keep it as private with no verifications, so
                    // every pod proves access again.
                    match image_id_of(name) {
                        Some(image_id) => {
                            tracing::warn!(path = %path.display(), image_id, "image record unreadable or not authentic; kept as private with no verifications");
                            self.tombstone(&image_id);
                        }
                        None => {
                            let _ = fs::remove_file(&path);
                            tracing::warn!(path = %path.display(), "unreadable file in the image records dropped");
                        }
                    }
                }
            }
        }
        let by_stem: HashMap<String, String> = self
            .records
            .iter()
            .map(|r| (name_stem(&file_name(r.key())).to_owned(), r.key().clone()))
            .collect();
        for (stem, path) in entry_dirs {
            let Some(image_id) = by_stem.get(&stem) else {
                // No record: the entries of a pruned image, or of a head
                // that went missing (its image, if listed, comes back
                // private without them).
                let _ = fs::remove_dir_all(&path);
                continue;
            };
            if self.is_unwritten(image_id) {
                continue; // a tombstone: its write removes them
            }
            if !self.load_entries(image_id, &path) {
                dropped += 1;
                tracing::warn!(path = %path.display(), image_id, "an entry of the image record is unreadable or not authentic; kept as private with no verifications");
                self.tombstone(image_id);
            }
        }
        // Rewritten as head and entries by the flush at open.
        let migrated = legacy_ids
            .iter()
            .filter(|id| !self.is_unwritten(id))
            .inspect(|id| self.mark_all(id))
            .count();
        Ok((dropped, migrated))
    }

    /// Reads a record's entries into it; `false` if any is unreadable or
    /// not authentic (the caller drops the record).
    fn load_entries(&self, image_id: &str, dir: &Path) -> bool {
        let Ok(files) = fs::read_dir(dir) else {
            return false;
        };
        let mut read = Vec::new();
        for file in files {
            let Ok(file) = file else { return false };
            let path = file.path();
            let name = file.file_name();
            let Some(name) = name.to_str() else {
                return false;
            };
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(&path);
                continue;
            }
            match self.read_entry(&path, image_id) {
                Some(value) if entry_file_name(&value) == name => read.push(value),
                _ => return false,
            }
        }
        let Some(mut record) = self.records.get_mut(image_id) else {
            return true;
        };
        for value in read {
            // Beside a legacy head the entries of an interrupted rewrite:
            // the newer of the two wins.
            match value {
                EntryValue::Grant { pod, grant } => {
                    let newer = record
                        .grants
                        .get(&pod)
                        .is_none_or(|g| g.verified_at <= grant.verified_at);
                    if newer {
                        record.grants.map.insert(pod, grant);
                    }
                }
                EntryValue::Verified { credential, at } => {
                    let at = record.verified.get(&credential).map_or(at, |a| at.max(*a));
                    record.verified.map.insert(credential, at);
                }
            }
        }
        true
    }

    /// Marks a whole record (head and every entry) to be written.
    fn mark_all(&self, image_id: &str) {
        if let Some(mut record) = self.records.get_mut(image_id) {
            record.verified.mark_all();
            record.grants.mark_all();
        }
        lock(&self.dirty).insert(image_id.to_owned(), true);
    }

    /// Keeps `image_id` as private with no verifications, to be written.
    fn tombstone(&self, image_id: &str) {
        self.records.insert(
            image_id.to_owned(),
            ImageRecord::new(image_id, Provenance::Credentials),
        );
        self.touch(image_id);
        lock(&self.unwritten).insert(image_id.to_owned());
    }

    /// Reads the inventory; every image it lists without a record comes
    /// back as private. Returns how many were missing.
    fn load_inventory(&self) -> usize {
        let listed = match fs::read(&self.inventory_path) {
            Ok(body) => match self.verify_inventory(&body) {
                Some(listed) => listed,
                None => {
                    tracing::error!(path = %self.inventory_path.display(), "image inventory unreadable or not authentic; rebuilt from the record files (a record file deleted together with it goes unnoticed)");
                    BTreeSet::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !self.records.is_empty() {
                    tracing::warn!(path = %self.inventory_path.display(), records = self.records.len(), "no image inventory; built from the record files");
                }
                BTreeSet::new()
            }
            Err(error) => {
                tracing::error!(path = %self.inventory_path.display(), %error, "reading the image inventory; rebuilt from the record files");
                BTreeSet::new()
            }
        };
        let mut missing = 0;
        for image_id in &listed {
            if !self.records.contains_key(image_id) {
                missing += 1;
                tracing::warn!(
                    image_id,
                    "image record missing although the inventory lists it; kept as private with no verifications"
                );
                self.tombstone(image_id);
            }
        }
        let complete = self.records.iter().all(|r| listed.contains(r.key()));
        *lock(&self.inventory) = listed;
        if !complete {
            // Records not listed yet (written just before a crash, or no
            // inventory at all): list them with the next write.
            let ids: Vec<String> = self.records.iter().map(|r| r.key().clone()).collect();
            let inventory = lock(&self.inventory);
            lock(&self.unwritten).extend(ids.into_iter().filter(|id| !inventory.contains(id)));
        }
        missing
    }

    fn verify_inventory(&self, body: &[u8]) -> Option<BTreeSet<String>> {
        let file: SignedInventory = serde_json::from_slice(body).ok()?;
        let content = serde_json::to_vec(&file.inventory).ok()?;
        hmac::verify(&self.key, &content, &hex_decode(&file.mac)?).ok()?;
        Some(file.inventory.images)
    }

    /// Loads the intents of pulls an earlier run did not finish recording.
    fn load_intents(&self) -> usize {
        let Ok(entries) = fs::read_dir(&self.intents_dir) else {
            return 0;
        };
        let mut stale = lock(&self.stale_intents);
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                let _ = fs::remove_file(&path);
                continue;
            }
            let reference = fs::read(&path)
                .ok()
                .and_then(|body| serde_json::from_slice::<SignedIntent>(&body).ok())
                .filter(|file| {
                    serde_json::to_vec(&file.intent)
                        .ok()
                        .is_some_and(|content| {
                            hex_decode(&file.mac)
                                .is_some_and(|mac| hmac::verify(&self.key, &content, &mac).is_ok())
                        })
                })
                .and_then(|file| ImageRef::parse(&file.intent.reference).ok());
            match reference {
                Some(reference) => {
                    tracing::warn!(reference = %reference, "a pull of an earlier run has no record on disk; the image it produced is kept as private");
                    stale.push(StaleIntent { path, reference });
                }
                None => {
                    tracing::warn!(path = %path.display(), "unreadable or not authentic pull intent dropped");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        stale.len()
    }

    /// Reads a head, or a record of the single-file format (`true`).
    fn read_head(&self, path: &Path) -> Option<(ImageRecord, bool)> {
        let body = fs::read(path).ok()?;
        if let Ok(file) = serde_json::from_slice::<SignedHead>(&body) {
            let content = serde_json::to_vec(&file.head).ok()?;
            self.verify(HEAD_DOMAIN, &content, &file.mac)?;
            let mut record = ImageRecord::new(&file.head.image_id, file.head.provenance);
            record.repositories = file.head.repositories;
            return Some((record, false));
        }
        let file: LegacyFile = serde_json::from_slice(&body).ok()?;
        let content = serde_json::to_vec(&file.record).ok()?;
        self.verify(b"", &content, &file.mac)?;
        let legacy = file.record;
        let mut record = ImageRecord::new(&legacy.image_id, legacy.provenance);
        record.repositories = legacy.repositories;
        record.verified.map = legacy.verified;
        record.grants.map = legacy.grants;
        Some((record, true))
    }

    /// Reads one entry of `image_id`'s record; `None` unless authentic and
    /// of that image.
    fn read_entry(&self, path: &Path, image_id: &str) -> Option<EntryValue> {
        let body = fs::read(path).ok()?;
        let file: SignedEntry = serde_json::from_slice(&body).ok()?;
        let content = serde_json::to_vec(&file.entry).ok()?;
        self.verify(ENTRY_DOMAIN, &content, &file.mac)?;
        (file.entry.image_id == image_id).then_some(file.entry.value)
    }

    fn sign(&self, domain: &[u8], content: &[u8]) -> String {
        let mut context = hmac::Context::with_key(&self.key);
        context.update(domain);
        context.update(content);
        hex(context.sign().as_ref())
    }

    fn verify(&self, domain: &[u8], content: &[u8], mac: &str) -> Option<()> {
        let mac = hex_decode(mac)?;
        let mut message = Vec::with_capacity(domain.len() + content.len());
        message.extend_from_slice(domain);
        message.extend_from_slice(content);
        hmac::verify(&self.key, &message, &mac).ok()
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
    /// A new record is written through ([`RecordStore::persist`]); a
    /// changed one is written behind (see [`RecordStore::schedule_flush`]);
    /// a decision that changes nothing costs no I/O.
    ///
    /// An error means the change is in memory (it holds while the process
    /// runs) but the new record is not on disk yet: a caller about to
    /// answer a pull with success must fail it instead.
    pub fn update(
        &self,
        image_id: &str,
        provenance: Provenance,
        change: impl FnOnce(&mut ImageRecord) -> bool,
    ) -> Result<Stored, RecordError> {
        let stored = self.change(image_id, provenance, change);
        if stored == Stored::Created {
            self.persist(image_id)?;
        }
        Ok(stored)
    }

    /// [`RecordStore::update`] without any I/O, for callers on an async
    /// worker: a [`Stored::Created`] record is then theirs to
    /// [`RecordStore::persist`] (off the worker) before they rely on it; a
    /// [`Stored::Deferred`] one waits for a flush.
    pub fn change(
        &self,
        image_id: &str,
        provenance: Provenance,
        change: impl FnOnce(&mut ImageRecord) -> bool,
    ) -> Stored {
        // Touched first: a pruner never sees the record older than it is.
        self.touch(image_id);
        let mut created = false;
        let mut entry = self.records.entry(image_id.to_owned()).or_insert_with(|| {
            created = true;
            ImageRecord::new(image_id, provenance)
        });
        let record = entry.value_mut();
        let (provenance_before, repositories_before) =
            (record.provenance, record.repositories.clone());
        let pending_before = record.verified.changed.len() + record.grants.changed.len();
        let reported = change(record);
        // Entries this change marked (one marked before is written anyway,
        // with its value at the time of the write).
        let entries_changed =
            record.verified.changed.len() + record.grants.changed.len() > pending_before;
        // A change the closure reports that shows nowhere else rewrites
        // the head (there is nothing else to write).
        let head_changed = record.provenance != provenance_before
            || record.repositories != repositories_before
            || (reported && !entries_changed);
        if created {
            lock(&self.unwritten).insert(image_id.to_owned());
        }
        drop(entry);
        if created {
            return Stored::Created;
        }
        if !(head_changed || entries_changed) {
            return Stored::Unchanged;
        }
        *lock(&self.dirty).entry(image_id.to_owned()).or_default() |= head_changed;
        Stored::Deferred
    }

    fn touch(&self, image_id: &str) {
        let generation = self.generation.fetch_add(1, AtomicOrdering::AcqRel) + 1;
        self.touched.insert(image_id.to_owned(), generation);
    }

    /// The count of record changes so far. A pruner reads it before it lists
    /// the runtime's images and hands it to [`RecordStore::prune`]: a record
    /// changed after that (a pull that ended meanwhile) is not pruned on the
    /// strength of a list that may predate its image.
    pub fn generation(&self) -> u64 {
        self.generation.load(AtomicOrdering::Acquire)
    }

    /// Makes sure the record of `image_id` exists on disk — listed in the
    /// inventory and written — and removes the intents of the pull that
    /// produced it. No I/O when it already is.
    pub fn persist(&self, image_id: &str) -> Result<(), RecordError> {
        if !lock(&self.unwritten).contains(image_id) {
            return Ok(());
        }
        let _io = lock(&self.io);
        self.persist_locked(image_id)
    }

    fn persist_locked(&self, image_id: &str) -> Result<(), RecordError> {
        if !lock(&self.unwritten).contains(image_id) {
            return Ok(()); // written meanwhile
        }
        let Some(record) = self.get(image_id) else {
            lock(&self.unwritten).remove(image_id); // pruned meanwhile
            return Ok(());
        };
        // Listed first: a crash between the two writes leaves an image
        // listed without a record, which comes back private.
        if !lock(&self.inventory).contains(image_id) {
            self.write_inventory()?;
        }
        self.write_whole(&record)?;
        // Written whole: nothing of it is pending any more.
        // (Keys changed again since the copy was taken stay marked.)
        if let Some(mut current) = self.records.get_mut(image_id) {
            let Entries { map, changed } = &mut current.verified;
            changed.retain(|k| record.verified.get(k) != map.get(k));
            let Entries { map, changed } = &mut current.grants;
            changed.retain(|k| record.grants.get(k) != map.get(k));
        }
        lock(&self.unwritten).remove(image_id);
        let intents = lock(&self.intents_by_image).remove(image_id);
        for path in intents.into_iter().flatten() {
            remove_intent_file(&path);
        }
        Ok(())
    }

    /// Whether the record of `image_id` is not on disk yet.
    pub fn is_unwritten(&self, image_id: &str) -> bool {
        lock(&self.unwritten).contains(image_id)
    }

    /// Writes the inventory of every record in memory. Holds the io lock.
    fn write_inventory(&self) -> Result<(), RecordError> {
        let images: BTreeSet<String> = self.records.iter().map(|r| r.key().clone()).collect();
        let signed = SignedInventory {
            mac: String::new(),
            inventory: Inventory {
                images: images.clone(),
            },
        };
        let encode = |e: serde_json::Error| io("encode", &self.inventory_path, e.into());
        let content = serde_json::to_vec(&signed.inventory).map_err(encode)?;
        let signed = SignedInventory {
            mac: hex(hmac::sign(&self.key, &content).as_ref()),
            ..signed
        };
        write_atomically(
            &self.inventory_path,
            &serde_json::to_vec(&signed).map_err(encode)?,
        )?;
        *lock(&self.inventory) = images;
        Ok(())
    }

    /// Records on disk, before it is sent to the runtime, that `reference`
    /// is being pulled with credentials. If the guard dies before the
    /// image's record is written, the next start treats the image that
    /// pull produced as private. An error means nothing may be pulled.
    pub fn begin_pull(&self, reference: &ImageRef) -> Result<PullIntent, RecordError> {
        let mut nonce = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| RecordError::Random)?;
        let path = self.intents_dir.join(format!("{}.json", hex(&nonce)));
        let intent = Intent {
            reference: reference.to_string(),
            started: unix(SystemTime::now()),
        };
        let content = serde_json::to_vec(&intent).map_err(|e| io("encode", &path, e.into()))?;
        let mac = hex(hmac::sign(&self.key, &content).as_ref());
        let body = serde_json::to_vec(&SignedIntent { intent, mac })
            .map_err(|e| io("encode", &path, e.into()))?;
        let _io = lock(&self.io);
        write_atomically(&path, &body)?;
        Ok(PullIntent {
            path,
            reference: reference.clone(),
            stale: Some(Arc::clone(&self.stale_intents)),
        })
    }

    /// Ends a pull intent. `image_id`: the image the pull produced (its
    /// record is created by now); the intent is removed once that record
    /// is on disk. `None`: the runtime pulled nothing; it is removed now.
    pub fn end_pull(&self, intent: PullIntent, image_id: Option<&str>) {
        let path = intent.end();
        match image_id {
            Some(id) if self.is_unwritten(id) => {
                lock(&self.intents_by_image)
                    .entry(id.to_owned())
                    .or_default()
                    .push(path);
            }
            _ => remove_intent_file(&path),
        }
    }

    /// Keeps a pull intent as a stale one: the runtime may hold an image
    /// from it that credlet could not identify.
    pub fn abandon_pull(&self, intent: PullIntent) {
        drop(intent);
    }

    /// Whether pull intents of an earlier run wait to be matched.
    pub fn has_stale_intents(&self) -> bool {
        !lock(&self.stale_intents).is_empty()
    }

    /// For an image with no record: if a stale pull intent produced it (its
    /// `names` include the intent's reference), keeps it as private with no
    /// verifications. Returns whether it did.
    pub fn claim_stale_intent(&self, image_id: &str, names: &[ImageRef]) -> bool {
        let matched: Vec<StaleIntent> = {
            let mut stale = lock(&self.stale_intents);
            let (matched, rest) = std::mem::take(&mut *stale)
                .into_iter()
                .partition(|i| pulled_as(&i.reference, names));
            *stale = rest;
            matched
        };
        if matched.is_empty() {
            return false;
        }
        tracing::warn!(image_id, reference = %matched[0].reference, "image of an unrecorded pull kept as private with no verifications");
        let result = self.update(image_id, Provenance::Credentials, |_| false);
        let mut intents = lock(&self.intents_by_image);
        let paths = intents.entry(image_id.to_owned()).or_default();
        paths.extend(matched.into_iter().map(|i| i.path));
        drop(intents);
        match result {
            Ok(_) => {
                // Written: the intents can go.
                if !self.is_unwritten(image_id) {
                    let paths = lock(&self.intents_by_image).remove(image_id);
                    for path in paths.into_iter().flatten() {
                        remove_intent_file(&path);
                    }
                }
            }
            Err(error) => {
                tracing::error!(%error, image_id, "writing the record of an unrecorded pull; kept in memory, retried");
            }
        }
        true
    }

    /// Settles the stale pull intents against the images the runtime holds
    /// (`(id, names)`): an image one produced is kept as private; an intent
    /// that produced nothing (the pull never finished) is dropped.
    pub fn settle_stale_intents(&self, images: &[(String, Vec<ImageRef>)]) {
        if !self.has_stale_intents() {
            return;
        }
        for (id, names) in images {
            if !self.records.contains_key(id) {
                self.claim_stale_intent(id, names);
            }
        }
        let left = std::mem::take(&mut *lock(&self.stale_intents));
        for intent in left {
            tracing::info!(reference = %intent.reference, "an unrecorded pull of an earlier run produced no image; intent dropped");
            remove_intent_file(&intent.path);
        }
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

    /// Writes every record changed in memory, and every record not on disk
    /// yet. Returns how many were written; on an error the unwritten ones
    /// stay pending. The io lock is taken per record, so a new record that
    /// must be on disk before its call is answered waits for one write, not
    /// for the whole flush. A changed record has only its changed entries
    /// (and its head, if that changed) written.
    pub fn flush(&self) -> Result<usize, RecordError> {
        let mut written = 0;
        let unwritten: Vec<String> = lock(&self.unwritten).iter().cloned().collect();
        for image_id in &unwritten {
            self.persist(image_id)?;
            written += 1;
        }
        let pending: Vec<(String, bool)> = lock(&self.dirty).drain().collect();
        for (i, (image_id, head)) in pending.iter().enumerate() {
            if unwritten.contains(image_id) {
                continue; // just written whole
            }
            let io = lock(&self.io);
            if let Err(error) = self.write_changes(image_id, *head) {
                drop(io);
                let mut dirty = lock(&self.dirty);
                for (id, head) in &pending[i..] {
                    *dirty.entry(id.clone()).or_default() |= *head;
                }
                return Err(error);
            }
            drop(io);
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
        lock(&self.dirty).len() + lock(&self.unwritten).len()
    }

    /// Writes what changed in a record since it was last written: each
    /// changed entry (a removed one's file removed), then the head if
    /// `head`. Holds the io lock; copies the values under it, so an older
    /// copy never overwrites a newer one. On an error the entries stay
    /// marked.
    fn write_changes(&self, image_id: &str, head: bool) -> Result<(), RecordError> {
        let Some(mut record) = self.records.get_mut(image_id) else {
            return Ok(()); // pruned meanwhile
        };
        let verified = record.verified.take_changed();
        let grants = record.grants.take_changed();
        let head = head.then(|| Head::of(&record));
        drop(record);
        let written = (|| {
            for (credential, at) in &verified {
                let value = at.map(|at| EntryValue::Verified {
                    credential: credential.clone(),
                    at,
                });
                self.write_entry(image_id, entry_name_verified(credential), value)?;
            }
            for (pod, grant) in &grants {
                let value = grant.clone().map(|grant| EntryValue::Grant {
                    pod: pod.clone(),
                    grant,
                });
                self.write_entry(image_id, entry_name_grant(pod), value)?;
            }
            match &head {
                Some(head) => self.write_head(head),
                None => Ok(()),
            }
        })();
        if written.is_err()
            && let Some(mut record) = self.records.get_mut(image_id)
        {
            record.verified.remark(verified.into_iter().map(|(k, _)| k));
            record.grants.remark(grants.into_iter().map(|(k, _)| k));
        }
        written
    }

    /// Writes a record whole: its entries directory holds exactly its
    /// entries (anything else there is removed first: a dropped record's
    /// entries must not come back), then its head. Holds the io lock.
    fn write_whole(&self, record: &ImageRecord) -> Result<(), RecordError> {
        let image_id = &record.image_id;
        let dir = self.entries_dir(image_id);
        let keep: HashSet<String> = record
            .verified
            .keys()
            .map(entry_name_verified)
            .chain(record.grants.keys().map(|p| entry_name_grant(p)))
            .collect();
        match fs::read_dir(&dir) {
            Ok(files) => {
                for file in files {
                    let file = file.map_err(|e| io("list", &dir, e))?;
                    let keep_it = file.file_name().to_str().is_some_and(|n| keep.contains(n));
                    if !keep_it {
                        remove_file(&file.path())?;
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("list", &dir, e)),
        }
        for (credential, at) in record.verified.iter() {
            let value = EntryValue::Verified {
                credential: credential.clone(),
                at: *at,
            };
            self.write_entry(image_id, entry_name_verified(credential), Some(value))?;
        }
        for (pod, grant) in record.grants.iter() {
            let value = EntryValue::Grant {
                pod: pod.clone(),
                grant: grant.clone(),
            };
            self.write_entry(image_id, entry_name_grant(pod), Some(value))?;
        }
        if keep.is_empty() {
            match fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove", &dir, e)),
            }
        }
        self.write_head(&Head::of(record))
    }

    /// Writes a record's head file. Holds the io lock.
    fn write_head(&self, head: &Head) -> Result<(), RecordError> {
        let path = self.dir.join(file_name(&head.image_id));
        let content = serde_json::to_vec(head).map_err(|e| io("encode", &path, e.into()))?;
        let mac = self.sign(HEAD_DOMAIN, &content);
        let body = serde_json::to_vec(&SignedHead {
            head: Head {
                image_id: head.image_id.clone(),
                provenance: head.provenance,
                repositories: head.repositories.clone(),
            },
            mac,
        })
        .map_err(|e| io("encode", &path, e.into()))?;
        write_atomically(&path, &body)
    }

    /// Writes one entry file of `image_id`'s record (`None`: removes it).
    /// Its cost does not depend on how many entries the record has. Holds
    /// the io lock.
    fn write_entry(
        &self,
        image_id: &str,
        name: String,
        value: Option<EntryValue>,
    ) -> Result<(), RecordError> {
        let dir = self.entries_dir(image_id);
        let path = dir.join(name);
        let Some(value) = value else {
            return remove_file(&path);
        };
        let entry = Entry {
            image_id: image_id.to_owned(),
            value,
        };
        let content = serde_json::to_vec(&entry).map_err(|e| io("encode", &path, e.into()))?;
        let mac = self.sign(ENTRY_DOMAIN, &content);
        let body = serde_json::to_vec(&SignedEntry { entry, mac })
            .map_err(|e| io("encode", &path, e.into()))?;
        match write_atomically(&path, &body) {
            Err(RecordError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                // The record's first entry: its directory first.
                fs::create_dir(&dir).map_err(|e| io("create", &dir, e))?;
                write_atomically(&path, &body)
            }
            other => other,
        }
    }

    /// `images/<id>.d`: where a record's entries are.
    fn entries_dir(&self, image_id: &str) -> PathBuf {
        self.dir
            .join(format!("{}.d", name_stem(&file_name(image_id))))
    }

    /// Drops records of images no longer on the node and grants of pods
    /// no longer on it. Returns (images removed, grants removed).
    ///
    /// `listed_at`: [`RecordStore::generation`] read before the runtime's
    /// images and the pods were listed. A record changed since is left as
    /// it is (its image may have arrived after the list was taken).
    pub fn prune(
        &self,
        present_images: &HashSet<String>,
        live_pods: Option<&HashSet<String>>,
        listed_at: u64,
    ) -> Result<(usize, usize), RecordError> {
        let _io = lock(&self.io);
        let settled = |id: &str| self.touched.get(id).is_none_or(|g| *g <= listed_at);
        let gone: Vec<String> = self
            .records
            .iter()
            .filter(|r| !present_images.contains(r.key()) && settled(r.key()))
            .map(|r| r.key().clone())
            .collect();
        let mut removed = 0;
        for id in &gone {
            // Changed between the filter and here: kept.
            if self.records.remove_if(id, |id, _| settled(id)).is_none() {
                continue;
            }
            removed += 1;
            self.touched.remove(id);
            lock(&self.unwritten).remove(id);
            lock(&self.dirty).remove(id);
            // The head first: entries without a head are never read.
            remove_file(&self.dir.join(file_name(id)))?;
            let entries = self.entries_dir(id);
            match fs::remove_dir_all(&entries) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove", &entries, e)),
            }
            for intent in lock(&self.intents_by_image)
                .remove(id)
                .into_iter()
                .flatten()
            {
                remove_intent_file(&intent);
            }
        }
        if removed > 0 {
            // Unlisted after their files are gone: a crash in between only
            // leaves a listed image the runtime no longer has.
            self.write_inventory()?;
        }
        let mut grants_removed = 0;
        if let Some(live) = live_pods {
            let ids: Vec<String> = self.records.iter().map(|r| r.key().clone()).collect();
            for id in ids {
                if !settled(&id) {
                    continue;
                }
                let changed = match self.records.get_mut(&id) {
                    Some(mut record) => {
                        let before = record.grants.len();
                        record.grants.retain(|uid, _| live.contains(uid));
                        grants_removed += before - record.grants.len();
                        record.grants.len() != before
                    }
                    None => false,
                };
                // One file removed per grant; a record not on disk yet is
                // written whole later.
                if changed && !lock(&self.unwritten).contains(&id) {
                    self.write_changes(&id, false)?;
                }
            }
        }
        Ok((removed, grants_removed))
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

/// Writes `body` to a temporary name next to `path` (0600) and renames it.
fn write_atomically(path: &Path, body: &[u8]) -> Result<(), RecordError> {
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io("write", &tmp, e))?;
    file.write_all(body).map_err(|e| io("write", &tmp, e))?;
    drop(file);
    fs::rename(&tmp, path).map_err(|e| io("rename", path, e))
}

/// Removes a file; one that is not there is fine.
fn remove_file(path: &Path) -> Result<(), RecordError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("remove", path, e)),
    }
}

/// `sha256-abc.json` → `sha256-abc`.
fn name_stem(file_name: &str) -> &str {
    file_name.strip_suffix(".json").unwrap_or(file_name)
}

/// The file of a credential's verification: `v-<hex of the id>.json`
/// (hex: the name can hold nothing but what it names).
fn entry_name_verified(credential: &CredentialId) -> String {
    format!("v-{}.json", hex(credential.as_str().as_bytes()))
}

/// The file of a pod's grant: `g-<hex of the uid>.json` (any CRI caller
/// can put anything in a sandbox's uid).
fn entry_name_grant(pod_uid: &str) -> String {
    format!("g-{}.json", hex(pod_uid.as_bytes()))
}

/// The file an entry belongs in.
fn entry_file_name(value: &EntryValue) -> String {
    match value {
        EntryValue::Grant { pod, .. } => entry_name_grant(pod),
        EntryValue::Verified { credential, .. } => entry_name_verified(credential),
    }
}

fn remove_intent_file(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        // Left behind, it marks an image private that is private anyway.
        Err(error) => tracing::warn!(path = %path.display(), %error, "removing a pull intent"),
    }
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

    /// The files of `ID`'s record: its head and its entries directory.
    fn record_paths(tmp: &Path) -> (PathBuf, PathBuf) {
        let images = tmp.join("imageguard/images");
        (
            images.join(file_name(ID)),
            images.join(format!("{}.d", name_stem(&file_name(ID)))),
        )
    }

    #[test]
    fn tampered_or_corrupt_records_fail_closed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (head, entries) = record_paths(tmp.path());
        let grant_file = entries.join(entry_name_grant("pod-1"));
        // (what is done to the record on disk, what it says)
        type Tamper = fn(&Path, &Path, &Path);
        let table: [(Tamper, &str); 6] = [
            (
                |head, _, _| {
                    let text = fs::read_to_string(head).expect("read");
                    fs::write(head, text.replace("credentials", "anonymous")).expect("tamper");
                },
                "the head's provenance changed",
            ),
            (
                |_, _, grant| {
                    let text = fs::read_to_string(grant).expect("read");
                    fs::write(grant, text.replace("\"c1\"", "\"c2\"")).expect("tamper");
                },
                "a grant's credential changed",
            ),
            (
                |_, entries, grant| {
                    fs::rename(grant, entries.join(entry_name_grant("pod-2"))).expect("rename");
                },
                "a grant moved to another pod's name",
            ),
            (
                |_, entries, grant| {
                    let other = entries.with_file_name("sha256-other.d");
                    fs::create_dir_all(&other).expect("dir");
                    // An authentic grant of another image, copied in.
                    fs::copy(grant, other.join("x")).expect("copy");
                    let text = fs::read_to_string(grant).expect("read");
                    fs::write(
                        entries.join(entry_name_grant("pod-9")),
                        text.replace("pod-1", "pod-9"),
                    )
                    .expect("forge");
                },
                "a grant forged for another pod",
            ),
            (
                |_, _, grant| fs::write(grant, b"{").expect("truncate"),
                "a grant file truncated",
            ),
            (
                |head, _, _| fs::write(head, b"{\"head\":").expect("truncate"),
                "the head truncated",
            ),
        ];
        for (tamper, what) in table {
            {
                let (store, _) = RecordStore::open(tmp.path()).expect("open");
                grant(&store);
            }
            tamper(&head, &entries, &grant_file);
            let (store, opened) = RecordStore::open_report(tmp.path()).expect("reopen");
            assert_eq!(opened.dropped, 1, "{what}");
            // Kept as private with nothing verified: fail closed, not open.
            let kept = store.get(ID).expect("tombstone");
            assert_eq!(kept.provenance, Provenance::Credentials, "{what}");
            assert!(kept.grants.is_empty() && kept.verified.is_empty(), "{what}");
            drop(store);
            // The tombstone itself is authentic on the next start, and no
            // entry of the dropped record comes back.
            let (store, opened) = RecordStore::open_report(tmp.path()).expect("reopen");
            assert_eq!(opened.dropped, 0, "{what}");
            let kept = store.get(ID).expect("tombstone");
            assert!(kept.grants.is_empty() && kept.verified.is_empty(), "{what}");
            assert!(!entries.exists(), "{what}: entries left on disk");
            store
                .prune(&HashSet::new(), None, store.generation())
                .expect("start over");
        }

        let (store, _) = RecordStore::open(tmp.path()).expect("open");
        grant(&store);
        drop(store);
        let file = head;

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

    fn inode(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .ino()
    }

    #[test]
    fn writing_one_grant_writes_one_small_file() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = Arc::new(RecordStore::open(tmp.path()).expect("open").0);
        grant(&store);
        let pods = 200;
        let credential = CredentialId("c1".into());
        let set = |pod: usize, at: u64| {
            store.change(ID, Provenance::Credentials, |r| {
                let grant = Grant {
                    credential: credential.clone(),
                    verified_at: at,
                };
                r.grants.insert(format!("pod-{pod}"), grant.clone()) != Some(grant)
            })
        };
        for pod in 0..pods {
            assert_eq!(set(pod, 1), Stored::Deferred);
        }
        assert_eq!(store.flush().expect("flush"), 1);
        let (head, entries) = record_paths(tmp.path());
        let files = |dir: &Path| -> BTreeMap<String, (u64, u64)> {
            fs::read_dir(dir)
                .expect("ls")
                .map(|f| {
                    let f = f.expect("entry");
                    let len = f.metadata().expect("stat").len();
                    (
                        f.file_name().into_string().expect("utf-8"),
                        (inode(&f.path()), len),
                    )
                })
                .collect()
        };
        let before = files(&entries);
        // The pods' grants (pod-1 of `grant` among them) and c1's
        // verification.
        assert_eq!(before.len(), pods + 1);
        let head_before = inode(&head);

        // A new verification of one pod: that one file, nothing else.
        assert_eq!(set(7, 2), Stored::Deferred);
        // The same grant again: nothing to write.
        assert_eq!(set(7, 2), Stored::Unchanged);
        assert_eq!(store.flush().expect("flush"), 1);
        let after = files(&entries);
        let rewritten: Vec<&String> = after
            .iter()
            .filter(|(name, file)| before.get(*name) != Some(file))
            .map(|(name, _)| name)
            .collect();
        assert_eq!(rewritten, [&entry_name_grant("pod-7")]);
        assert_eq!(inode(&head), head_before, "the head is not rewritten");
        let (_, size) = after[&entry_name_grant("pod-7")];
        assert!(size < 400, "one grant is a small file: {size} bytes");

        // A grant removed: its file removed.
        store.change(ID, Provenance::Credentials, |r| {
            r.grants.remove(&"pod-3".to_owned());
            true
        });
        store.flush().expect("flush");
        assert_eq!(files(&entries).len(), pods);
        assert!(!entries.join(entry_name_grant("pod-3")).exists());

        // And it all reads back.
        drop(store);
        let (store, opened) = RecordStore::open_report(tmp.path()).expect("reopen");
        assert_eq!(opened, Opened::default());
        let record = store.get(ID).expect("record");
        assert_eq!(record.grants.len(), pods - 1);
        assert_eq!(record.grants["pod-7"].verified_at, 2);
        assert!(!record.grants.contains_key("pod-3"));
    }

    /// Rewrites `ID`'s record on disk in the single-file format of earlier
    /// versions (entries inside, HMAC over the record), as they left it.
    fn write_legacy(store: &RecordStore, record: &LegacyRecord) {
        let content = serde_json::to_vec(record).expect("encode");
        let mac = hex(hmac::sign(&store.key, &content).as_ref());
        let body = serde_json::to_vec(&serde_json::json!({
            "record": serde_json::from_slice::<serde_json::Value>(&content).expect("json"),
            "mac": mac,
        }))
        .expect("encode");
        fs::write(store.dir.join(file_name(&record.image_id)), body).expect("write legacy");
    }

    fn legacy(grants: &[(&str, u64)]) -> LegacyRecord {
        LegacyRecord {
            image_id: ID.to_owned(),
            provenance: Provenance::Credentials,
            repositories: ["registry.example/team/app".to_owned()].into(),
            verified: [(CredentialId("c1".into()), 5)].into(),
            grants: grants
                .iter()
                .map(|(pod, at)| {
                    (
                        (*pod).to_owned(),
                        Grant {
                            credential: CredentialId("c1".into()),
                            verified_at: *at,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn records_of_the_single_file_format_are_read_and_rewritten_once() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (head, entries) = record_paths(tmp.path());
        {
            // The inventory as the earlier version wrote it, listing ID.
            let (store, _) = RecordStore::open(tmp.path()).expect("open");
            store
                .update(ID, Provenance::Credentials, |_| true)
                .expect("create");
            fs::remove_dir_all(&entries).ok();
            write_legacy(&store, &legacy(&[("pod-1", 5), ("pod-2", 6)]));
            std::mem::forget(store);
        }
        let (store, opened) = RecordStore::open_report(tmp.path()).expect("open old records");
        assert_eq!(
            opened,
            Opened {
                migrated: 1,
                ..Opened::default()
            }
        );
        let record = store.get(ID).expect("record");
        assert_eq!(record.grants.len(), 2);
        assert_eq!(record.verified[&CredentialId("c1".into())], 5);
        assert!(record.repositories.contains("registry.example/team/app"));
        std::mem::forget(store);
        // Rewritten at open: a head without entries, one file per entry.
        let text = fs::read_to_string(&head).expect("head");
        assert!(
            text.starts_with("{\"head\":") && !text.contains("pod-1"),
            "{text}"
        );
        assert_eq!(fs::read_dir(&entries).expect("entries").count(), 3);
        let (store, opened) = RecordStore::open_report(tmp.path()).expect("reopen");
        assert_eq!(opened, Opened::default(), "migrated once");
        assert_eq!(store.get(ID).expect("record"), record);
        std::mem::forget(store);

        // A rewrite interrupted after some entries were written: the old
        // head and the new entries together, the newer grant winning.
        let (store, _) = RecordStore::open(tmp.path()).expect("open");
        store
            .update(ID, Provenance::Credentials, |r| {
                r.grants.insert(
                    "pod-1".into(),
                    Grant {
                        credential: CredentialId("c1".into()),
                        verified_at: 9,
                    },
                );
                true
            })
            .expect("change");
        store.flush().expect("flush");
        write_legacy(&store, &legacy(&[("pod-1", 5), ("pod-3", 7)]));
        std::mem::forget(store);
        let (store, opened) = RecordStore::open_report(tmp.path()).expect("reopen");
        assert_eq!(opened.migrated, 1);
        let record = store.get(ID).expect("record");
        let grants: Vec<(&str, u64)> = record
            .grants
            .iter()
            .map(|(pod, g)| (pod.as_str(), g.verified_at))
            .collect();
        assert_eq!(grants, [("pod-1", 9), ("pod-2", 6), ("pod-3", 7)]);

        // A tampered record of the old format fails closed like any other.
        write_legacy(&store, &legacy(&[("pod-1", 5)]));
        let text = fs::read_to_string(&head).expect("legacy");
        fs::write(&head, text.replace("credentials", "anonymous")).expect("tamper");
        std::mem::forget(store);
        let (store, opened) = RecordStore::open_report(tmp.path()).expect("reopen");
        assert_eq!(opened.dropped, 1);
        let kept = store.get(ID).expect("tombstone");
        assert_eq!(kept.provenance, Provenance::Credentials);
        assert!(kept.grants.is_empty() && kept.verified.is_empty());
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
        let now = store.generation();
        assert_eq!(
            store.prune(&present, Some(&live), now).expect("prune"),
            (0, 1)
        );
        assert!(store.get(ID).expect("kept").grants.is_empty());
        let now = store.generation();
        assert_eq!(
            store.prune(&HashSet::new(), None, now).expect("prune"),
            (1, 0)
        );
        assert!(store.is_empty());
        assert_eq!(
            fs::read_dir(tmp.path().join("imageguard/images"))
                .expect("ls")
                .count(),
            0
        );
    }

    #[test]
    fn a_record_created_after_the_image_list_is_not_pruned() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (store, _) = RecordStore::open(tmp.path()).expect("open");
        // The pruner lists the runtime's images; the pull has not ended yet.
        let listed_at = store.generation();
        let listed: HashSet<String> = HashSet::new();
        // The pull ends: the image and its record are new.
        grant(&store);
        store
            .prune(&listed, Some(&HashSet::new()), listed_at)
            .expect("prune");
        let kept = store.get(ID);
        assert!(
            kept.is_some(),
            "the record of an image pulled while the pruner listed images was dropped"
        );
        assert_eq!(kept.expect("kept").grants.len(), 1, "and its grant");
        // The next round, with a list taken after the pull, prunes it.
        let listed_at = store.generation();
        assert_eq!(
            store.prune(&listed, None, listed_at).expect("prune"),
            (1, 0)
        );
    }

    #[test]
    fn file_names_cannot_escape() {
        assert_eq!(file_name("sha256:ab"), "sha256-ab.json");
        assert!(file_name("../../etc/passwd").starts_with("x-"));
        assert!(!file_name("a/b").contains('/'));
    }

    #[test]
    fn public_answers_expire_with_the_ttl() {
        let now = SystemTime::now();
        let ttl = Duration::from_secs(60);
        let at = |ago: u64| unix(now) - ago;
        // (provenance, anonymous success `ago` seconds ago, effective, expired)
        let table = [
            (Provenance::Anonymous, Some(0), Provenance::Anonymous, false),
            (
                Provenance::Anonymous,
                Some(59),
                Provenance::Anonymous,
                false,
            ),
            (
                Provenance::Anonymous,
                Some(60),
                Provenance::Credentials,
                true,
            ),
            (
                Provenance::Anonymous,
                Some(86_400),
                Provenance::Credentials,
                true,
            ),
            (Provenance::Anonymous, None, Provenance::Credentials, true),
            (
                Provenance::Credentials,
                Some(0),
                Provenance::Credentials,
                false,
            ),
            (
                Provenance::Credentials,
                None,
                Provenance::Credentials,
                false,
            ),
        ];
        for (provenance, ago, effective, expired) in table {
            let mut record = ImageRecord::new(ID, provenance);
            if let Some(ago) = ago {
                record.verified.insert(CredentialId::anonymous(), at(ago));
            }
            assert_eq!(
                record.effective_provenance(ttl, now),
                effective,
                "{provenance:?} {ago:?}"
            );
            assert_eq!(
                record.public_answer_expired(ttl, now),
                expired,
                "{provenance:?} {ago:?}"
            );
        }
    }

    #[test]
    fn a_deleted_record_file_comes_back_private() {
        let tmp = tempfile::tempdir().expect("tmp");
        {
            let (store, _) = RecordStore::open(tmp.path()).expect("open");
            grant(&store);
        }
        fs::remove_file(tmp.path().join("imageguard/images").join(file_name(ID))).expect("delete");
        let (store, opened) = RecordStore::open_report(tmp.path()).expect("reopen");
        assert_eq!(opened.missing, 1);
        let kept = store.get(ID).expect("listed in the inventory");
        assert_eq!(kept.provenance, Provenance::Credentials);
        assert!(kept.grants.is_empty() && kept.verified.is_empty());
        drop(store);
        // Written back: a plain record from now on.
        let (_store, opened) = RecordStore::open_report(tmp.path()).expect("reopen");
        assert_eq!(opened, Opened::default());
    }

    #[test]
    fn records_without_an_inventory_are_listed() {
        let tmp = tempfile::tempdir().expect("tmp");
        {
            let (store, _) = RecordStore::open(tmp.path()).expect("open");
            grant(&store);
        }
        // A store from before the inventory: the records build it.
        fs::remove_file(tmp.path().join("imageguard/inventory.json")).expect("delete");
        let (store, opened) = RecordStore::open_report(tmp.path()).expect("reopen");
        assert_eq!(opened, Opened::default());
        assert_eq!(store.pending(), 0, "inventory written at start");
        drop(store);
        fs::remove_file(tmp.path().join("imageguard/images").join(file_name(ID))).expect("delete");
        let (_store, opened) = RecordStore::open_report(tmp.path()).expect("reopen");
        assert_eq!(opened.missing, 1);
    }

    /// Makes a directory unwritable for root too: a file where it was.
    fn break_dir(dir: &Path) -> PathBuf {
        let aside = dir.with_extension("aside");
        fs::rename(dir, &aside).expect("move aside");
        fs::write(dir, b"not a directory").expect("file in its place");
        aside
    }

    fn mend_dir(dir: &Path, aside: &Path) {
        fs::remove_file(dir).expect("remove file");
        fs::rename(aside, dir).expect("move back");
    }

    #[test]
    fn an_unwritable_record_stays_in_memory_and_is_retried() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (store, _) = RecordStore::open(tmp.path()).expect("open");
        let images = tmp.path().join("imageguard/images");
        let aside = break_dir(&images);
        // A change alone does no I/O (async callers persist off the
        // workers): it succeeds, and the record waits to be written.
        let other = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
        assert_eq!(
            store.change(other, Provenance::Credentials, |_| true),
            Stored::Created
        );
        assert!(store.is_unwritten(other));
        let error = store
            .update(ID, Provenance::Credentials, |_| true)
            .expect_err("the record can not be written");
        assert!(error.to_string().contains("imageguard/images"), "{error}");
        assert!(store.is_unwritten(ID));
        assert_eq!(
            store.get(ID).expect("kept in memory").provenance,
            Provenance::Credentials
        );
        assert!(store.persist(ID).is_err());
        mend_dir(&images, &aside);
        store.persist(ID).expect("written once the disk is back");
        assert!(!store.is_unwritten(ID));
        assert!(on_disk(tmp.path()).is_some());
    }

    #[test]
    fn pull_intents_are_written_first_and_mark_unrecorded_images_private() {
        let tmp = tempfile::tempdir().expect("tmp");
        let reference = ImageRef::parse("registry.example/team/app:v1").expect("ref");
        let names = [reference.clone()];
        let intents = tmp.path().join("imageguard/pulling");
        {
            let (store, _) = RecordStore::open(tmp.path()).expect("open");
            // A finished pull: the intent goes with the record on disk.
            let intent = store.begin_pull(&reference).expect("intent");
            assert_eq!(fs::read_dir(&intents).expect("ls").count(), 1);
            store
                .update(ID, Provenance::Credentials, |_| true)
                .expect("record");
            store.end_pull(intent, Some(ID));
            assert_eq!(fs::read_dir(&intents).expect("ls").count(), 0);
            // No intent can be written: nothing may be pulled.
            let aside = break_dir(&intents);
            assert!(store.begin_pull(&reference).is_err());
            mend_dir(&intents, &aside);
            // A pull whose record is never written (the guard dies).
            let intent = store.begin_pull(&reference).expect("intent");
            std::mem::forget(intent);
        }
        let other = "sha256:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
        let (store, opened) = RecordStore::open_report(tmp.path()).expect("reopen");
        assert_eq!(opened.stale_intents, 1);
        assert!(store.has_stale_intents());
        // An image by another name is not what the pull produced.
        let unrelated = [ImageRef::parse("registry.example/team/app:v2").expect("ref")];
        assert!(!store.claim_stale_intent(other, &unrelated));
        assert!(store.claim_stale_intent(other, &names));
        let kept = store.get(other).expect("kept");
        assert_eq!(kept.provenance, Provenance::Credentials);
        assert!(kept.verified.is_empty());
        assert!(!store.has_stale_intents());
        assert_eq!(fs::read_dir(&intents).expect("ls").count(), 0);

        // A stale intent that produced no image is dropped when the
        // runtime's images are known.
        let intent = store.begin_pull(&reference).expect("intent");
        store.abandon_pull(intent);
        store.settle_stale_intents(&[(ID.to_owned(), names.to_vec())]);
        assert!(!store.has_stale_intents());
        assert_eq!(fs::read_dir(&intents).expect("ls").count(), 0);
    }
}
