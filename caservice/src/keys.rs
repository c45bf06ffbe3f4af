//! CA key material: loaded from PEM files, reloaded when they change, and
//! the trust bundle published with a generation number.
//!
//! Files: `cert` holds the signing certificate (a self-signed root or an
//! intermediate), `key` its PKCS#8 key, and the optional `chain` the
//! certificates above it up to and including the root. Every self-signed
//! certificate among them is a root of the trust bundle.
//!
//! The directories holding the files are watched with `notify` (Kubernetes
//! Secret volumes swap a `..data` symlink, so watching the files themselves
//! would miss updates). A change that does not load (garbage, a key that
//! does not match the certificate, a half-written rollover) keeps the
//! current authority serving; the error is logged, counted and reported by
//! [`KeyStore::status`].

use prometheus_client::metrics::counter::Counter;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use credlet_ca::{Authority, Policy};
use notify::{RecursiveMode, Watcher};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::watch;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::Error;

/// Where the CA's key material lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyFiles {
    /// The signing certificate, PEM.
    pub cert: PathBuf,
    /// Its PKCS#8 private key, PEM.
    pub key: PathBuf,
    /// Optional: intermediates above the signing certificate and the root.
    pub chain: Option<PathBuf>,
}

/// The roots to trust, as published to agents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustBundle {
    /// Roots, PEM: the current root(s) first, then previous roots still
    /// valid (during a rollover: old and new).
    pub pem: String,
    /// The roots, DER.
    pub roots_der: Vec<Vec<u8>>,
    /// Increases with every change.
    pub generation: u64,
}

/// Health of the key material.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyStatus {
    /// Successful loads (the first one included).
    pub loads: u64,
    /// Failed reloads since start.
    pub reload_errors: u64,
    /// The last reload error, cleared by the next successful load.
    pub last_error: Option<String>,
}

impl KeyStatus {
    /// True when the files on disk are what is serving.
    pub fn healthy(&self) -> bool {
        self.last_error.is_none()
    }
}

struct Loaded {
    fingerprint: ring::digest::Digest,
    roots: Vec<Root>,
}

#[derive(Clone)]
struct Root {
    der: Vec<u8>,
    not_after: i64,
}

/// The CA's current authority and trust bundle, reloadable.
pub struct KeyStore {
    files: KeyFiles,
    policy: Policy,
    authority_tx: watch::Sender<Arc<Authority>>,
    bundle_tx: watch::Sender<Arc<TrustBundle>>,
    state: Mutex<LoadState>,
    /// Shared with the metrics registry (`credlet_ca_key_reload_errors`).
    reload_errors: Counter,
}

struct LoadState {
    loaded: Loaded,
    /// Roots seen earlier in this process's life.
    previous: Vec<Root>,
    loads: u64,
    last_error: Option<String>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("files", &self.files)
            .field("generation", &self.bundle_tx.borrow().generation)
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl KeyStore {
    /// Loads the key material; fails if it does not load now.
    pub fn load(files: KeyFiles, policy: Policy) -> Result<Arc<Self>, Error> {
        let (authority, loaded) = load_files(&files, &policy)?;
        let bundle = Arc::new(bundle_of(&loaded.roots, &[], 1));
        Ok(Arc::new(Self {
            files,
            policy,
            authority_tx: watch::Sender::new(Arc::new(authority)),
            bundle_tx: watch::Sender::new(bundle),
            state: Mutex::new(LoadState {
                loaded,
                previous: Vec::new(),
                loads: 1,
                last_error: None,
            }),
            reload_errors: Counter::default(),
        }))
    }

    /// The authority serving now.
    pub fn authority(&self) -> Arc<Authority> {
        self.authority_tx.borrow().clone()
    }

    /// The trust bundle now.
    pub fn trust_bundle(&self) -> Arc<TrustBundle> {
        self.bundle_tx.borrow().clone()
    }

    /// Changes of the authority (a new key or certificate loaded).
    pub fn subscribe_authority(&self) -> watch::Receiver<Arc<Authority>> {
        self.authority_tx.subscribe()
    }

    /// Changes of the trust bundle.
    pub fn subscribe_bundle(&self) -> watch::Receiver<Arc<TrustBundle>> {
        self.bundle_tx.subscribe()
    }

    /// Load counters and the last error.
    pub fn status(&self) -> KeyStatus {
        let state = lock(&self.state);
        KeyStatus {
            loads: state.loads,
            reload_errors: self.reload_errors.get(),
            last_error: state.last_error.clone(),
        }
    }

    /// Registers `credlet_ca_key_reload_errors` (failed reloads: new key
    /// material that does not load while the previous keeps signing) and
    /// `credlet_ca_certificate_expiration_timestamp_seconds` (the signing
    /// CA certificate's notAfter, read at each scrape).
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        let sub = registry.sub_registry_with_prefix("credlet_ca");
        sub.register(
            "key_reload_errors",
            "CA key material that changed on disk but did not load (the previous CA keeps signing)",
            self.reload_errors.clone(),
        );
        sub.register_collector(Box::new(CaExpiry(self.subscribe_authority())));
    }

    /// The files this store loads.
    pub fn files(&self) -> &KeyFiles {
        &self.files
    }

    /// Reads the files again. Unchanged files: `Ok(false)`. Changed and
    /// valid: the new authority serves, the bundle gains the new roots
    /// (keeping previous, still valid ones) and `Ok(true)`. Invalid: the
    /// current authority keeps serving, the error is counted and returned.
    pub fn reload(&self) -> Result<bool, Error> {
        let result = self.try_reload();
        let mut state = lock(&self.state);
        match &result {
            Ok(_) => state.last_error = None,
            Err(error) => {
                self.reload_errors.inc();
                state.last_error = Some(error.to_string());
                tracing::error!(
                    error = %error,
                    "CA key material changed but does not load; the previous CA keeps serving"
                );
            }
        }
        result
    }

    fn try_reload(&self) -> Result<bool, Error> {
        let fingerprint = fingerprint(&self.files)?;
        if lock(&self.state).loaded.fingerprint.as_ref() == fingerprint.as_ref() {
            return Ok(false);
        }
        let (authority, loaded) = load_files(&self.files, &self.policy)?;
        let mut state = lock(&self.state);
        let old_roots = std::mem::take(&mut state.loaded.roots);
        for root in old_roots {
            if !loaded.roots.iter().any(|r| r.der == root.der)
                && !state.previous.iter().any(|r| r.der == root.der)
            {
                state.previous.push(root);
            }
        }
        let now = unix_now();
        state
            .previous
            .retain(|r| r.not_after > now && !loaded.roots.iter().any(|n| n.der == r.der));
        let generation = self.bundle_tx.borrow().generation;
        let bundle = bundle_of(&loaded.roots, &state.previous, generation);
        state.loaded = loaded;
        state.loads += 1;
        drop(state);
        self.authority_tx.send_replace(Arc::new(authority));
        self.bundle_tx.send_if_modified(|current| {
            if current.pem == bundle.pem {
                return false;
            }
            *current = Arc::new(TrustBundle {
                generation: current.generation + 1,
                ..bundle
            });
            true
        });
        tracing::info!(
            generation = self.bundle_tx.borrow().generation,
            "CA key material reloaded"
        );
        Ok(true)
    }

    /// Drops previous roots that have expired (call periodically).
    pub fn prune_expired_roots(&self) {
        let mut state = lock(&self.state);
        let now = unix_now();
        let before = state.previous.len();
        state.previous.retain(|r| r.not_after > now);
        if state.previous.len() != before {
            let bundle = bundle_of(&state.loaded.roots, &state.previous, 0);
            drop(state);
            self.bundle_tx.send_modify(|current| {
                *current = Arc::new(TrustBundle {
                    generation: current.generation + 1,
                    ..bundle
                });
            });
        }
    }

    /// Watches the files' directories and reloads on change (debounced by
    /// `debounce`). Runs until the returned handle is dropped or aborted.
    pub fn watch(self: &Arc<Self>, debounce: Duration) -> Result<KeyWatch, Error> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok() {
                    let _ = tx.try_send(());
                }
            })
            .map_err(|e| Error::Watch {
                path: "CA key files".into(),
                reason: e.to_string(),
            })?;
        let mut dirs: Vec<PathBuf> = Vec::new();
        let paths = [
            Some(&self.files.cert),
            Some(&self.files.key),
            self.files.chain.as_ref(),
        ];
        for path in paths.into_iter().flatten() {
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf();
            if !dirs.contains(&dir) {
                watcher
                    .watch(&dir, RecursiveMode::NonRecursive)
                    .map_err(|e| Error::Watch {
                        path: dir.display().to_string(),
                        reason: e.to_string(),
                    })?;
                dirs.push(dir);
            }
        }
        let store = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            let mut prune = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tokio::select! {
                    event = rx.recv() => {
                        if event.is_none() {
                            break;
                        }
                        // Let a writer finish (cert, then key) before reading.
                        tokio::time::sleep(debounce).await;
                        while rx.try_recv().is_ok() {}
                        let Some(store) = store.upgrade() else { break };
                        let _ = tokio::task::spawn_blocking(move || store.reload()).await;
                    }
                    _ = prune.tick() => {
                        let Some(store) = store.upgrade() else { break };
                        store.prune_expired_roots();
                    }
                }
            }
        });
        Ok(KeyWatch {
            _watcher: watcher,
            task,
        })
    }
}

/// A running watch on the key files; dropping it stops watching.
pub struct KeyWatch {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for KeyWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyWatch").finish_non_exhaustive()
    }
}

impl Drop for KeyWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::KeyMaterial {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn fingerprint(files: &KeyFiles) -> Result<ring::digest::Digest, Error> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for path in [Some(&files.cert), Some(&files.key), files.chain.as_ref()]
        .into_iter()
        .flatten()
    {
        let bytes = zeroize::Zeroizing::new(read(path)?);
        ctx.update(&(bytes.len() as u64).to_be_bytes());
        ctx.update(&bytes);
    }
    Ok(ctx.finish())
}

fn certificates(path: &Path, bytes: &[u8]) -> Result<Vec<Vec<u8>>, Error> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::KeyMaterial {
            path: path.display().to_string(),
            reason: format!("invalid PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(Error::KeyMaterial {
            path: path.display().to_string(),
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// PEM-encodes DER certificates.
pub fn certificates_pem<'a>(ders: impl IntoIterator<Item = &'a Vec<u8>>) -> String {
    let mut out = String::new();
    for der in ders {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = STANDARD.encode(der);
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

fn load_files(files: &KeyFiles, policy: &Policy) -> Result<(Authority, Loaded), Error> {
    let fingerprint = fingerprint(files)?;
    let cert_bytes = read(&files.cert)?;
    let mut all = certificates(&files.cert, &cert_bytes)?;
    if let Some(chain) = &files.chain {
        all.extend(certificates(chain, &read(chain)?)?);
    }
    let described = || match &files.chain {
        Some(chain) => format!(
            "{}, {} and {}",
            files.cert.display(),
            files.key.display(),
            chain.display()
        ),
        None => format!("{} and {}", files.cert.display(), files.key.display()),
    };
    let mut chain = Vec::new();
    let mut roots = Vec::new();
    for der in all {
        let (_, cert) = X509Certificate::from_der(&der).map_err(|e| Error::KeyMaterial {
            path: described(),
            reason: format!("unparsable certificate: {e}"),
        })?;
        if cert.subject().as_raw() == cert.issuer().as_raw() {
            roots.push(Root {
                not_after: cert.validity().not_after.timestamp(),
                der: der.clone(),
            });
            if chain.is_empty() {
                chain.push(der);
            }
        } else {
            chain.push(der);
        }
    }
    if roots.is_empty() {
        return Err(Error::KeyMaterial {
            path: described(),
            reason: "no self-signed root: put the intermediates and the root in the chain file"
                .into(),
        });
    }
    let key_pem = zeroize::Zeroizing::new(String::from_utf8(read(&files.key)?).map_err(|_| {
        Error::KeyMaterial {
            path: files.key.display().to_string(),
            reason: "not UTF-8 PEM".into(),
        }
    })?);
    let chain_pem = certificates_pem(&chain);
    let roots_pem = certificates_pem(roots.iter().map(|r| &r.der));
    let authority = Authority::from_pem(&chain_pem, &key_pem, &roots_pem, policy.clone()).map_err(
        |source| Error::Authority {
            path: described(),
            source,
        },
    )?;
    Ok((authority, Loaded { fingerprint, roots }))
}

fn bundle_of(current: &[Root], previous: &[Root], generation: u64) -> TrustBundle {
    let roots_der: Vec<Vec<u8>> = current
        .iter()
        .chain(previous.iter())
        .map(|r| r.der.clone())
        .collect();
    TrustBundle {
        pem: certificates_pem(&roots_der),
        roots_der,
        generation,
    }
}

/// `credlet_ca_certificate_expiration_timestamp_seconds`: the signing CA
/// certificate's notAfter, from the authority serving at scrape time.
#[derive(Debug)]
struct CaExpiry(watch::Receiver<Arc<Authority>>);

impl prometheus_client::collector::Collector for CaExpiry {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let expiry =
            prometheus_client::metrics::gauge::ConstGauge::new(self.0.borrow().ca_not_after_unix());
        expiry.encode(encoder.encode_descriptor(
            "certificate_expiration_timestamp_seconds",
            "When the signing CA certificate expires (notAfter), seconds since the Unix epoch",
            None,
            expiry.metric_type(),
        )?)
    }
}
