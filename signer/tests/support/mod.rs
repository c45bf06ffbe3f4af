//! Shared pieces of the signer's tests: a fake cluster with pods, service
//! accounts and nodes, the CA's key files, and PodCertificateRequests made
//! the way the kubelet makes them (real keys, real proofs of possession
//! over the pod UID).

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use credlet_ca::{Authority, Policy};
use credlet_ca_service::{KeyFiles, KeyStore, ServicePolicy};
use credlet_signer::controller::ApiVersionChoice;
use credlet_signer::request::ApiVersion;
use credlet_signer::{
    LeaseSettings, PublisherSettings, SignerMetrics, SignerRuntime, SignerRuntimeSettings,
    SignerSettings,
};
use credlet_test_util::FakeApiServer;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self as sig, KeyPair};
use serde_json::{Value, json};

/// The signer name the tests serve.
pub const SIGNER: &str = "credlet.io/pods";
/// The trust domain of the test CA.
pub const TRUST_DOMAIN: &str = "cluster.test";
/// The node pods run on.
pub const NODE: &str = "node-a";
/// `apiVersion` of the requests.
pub const PCR_API: &str = "certificates.k8s.io/v1beta1";
/// `apiVersion` of the bundles.
pub const CTB_API: &str = "certificates.k8s.io/v1beta1";

/// Waits for `what` to become true, polling every 20 ms.
pub async fn wait_for(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    while !check() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The fake API server, the CA and the identities requests refer to.
pub struct Cluster {
    pub server: FakeApiServer,
    pub dir: tempfile::TempDir,
    pub keys: Arc<KeyStore>,
    pub policy: Arc<ServicePolicy>,
    pub node_uid: String,
}

impl Cluster {
    /// A cluster with node `node-a` and a CA whose DNS policy allows
    /// `$POD_NAME.$POD_NAMESPACE.svc`.
    pub fn new() -> anyhow::Result<Self> {
        let server = FakeApiServer::start()?;
        let dir = tempfile::tempdir()?;
        let mut policy = ServicePolicy::new(TRUST_DOMAIN);
        policy.add_dns_template("$POD_NAME.$POD_NAMESPACE.svc")?;
        let files = write_ca(dir.path())?;
        let keys = KeyStore::load(files, policy.ca_policy())?;
        let mut cluster = Self {
            server,
            dir,
            keys,
            policy: Arc::new(policy),
            node_uid: String::new(),
        };
        cluster.node_uid = cluster.add_node(NODE)?;
        Ok(cluster)
    }

    /// Replaces the CA files with a new CA and reloads the key store.
    pub fn rotate_ca(&self) -> anyhow::Result<()> {
        write_ca(self.dir.path())?;
        anyhow::ensure!(self.keys.reload()?, "the new CA did not load");
        Ok(())
    }

    /// Replaces the CA with one whose certificate expires in `lifetime`
    /// (leaves outliving it can not be signed) and reloads the key store.
    pub fn install_short_lived_ca(&self, lifetime: Duration) -> anyhow::Result<()> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "short-lived test CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + lifetime;
        let cert = params.self_signed(&key)?;
        std::fs::write(self.dir.path().join("ca.crt"), cert.pem())?;
        std::fs::write(self.dir.path().join("ca.key"), key.serialize_pem())?;
        anyhow::ensure!(self.keys.reload()?, "the short-lived CA did not load");
        Ok(())
    }

    pub fn add_node(&self, name: &str) -> anyhow::Result<String> {
        let node = self.server.create(&json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name},
        }))?;
        uid(&node)
    }

    pub fn add_service_account(&self, namespace: &str, name: &str) -> anyhow::Result<String> {
        let sa = self.server.create(&json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace},
        }))?;
        uid(&sa)
    }

    pub fn add_pod(
        &self,
        namespace: &str,
        name: &str,
        service_account: &str,
        node: &str,
    ) -> anyhow::Result<String> {
        let pod = self.server.create(&json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "nodeName": node,
                "serviceAccountName": service_account,
                "containers": [{"name": "app", "image": "registry.example/app:1"}],
            },
        }))?;
        uid(&pod)
    }

    /// A pod with its own service account on `node-a`, and a request for
    /// it the way the kubelet writes it.
    pub fn pod_with_request(
        &self,
        namespace: &str,
        pod: &str,
        kind: KeyKind,
    ) -> anyhow::Result<RequestBuilder> {
        let sa = format!("{pod}-sa");
        let sa_uid = self.add_service_account(namespace, &sa)?;
        let pod_uid = self.add_pod(namespace, pod, &sa, NODE)?;
        Ok(RequestBuilder {
            namespace: namespace.to_owned(),
            name: format!("req-{pod}"),
            signer: SIGNER.to_owned(),
            pod: pod.to_owned(),
            pod_uid,
            service_account: sa,
            service_account_uid: sa_uid,
            node: NODE.to_owned(),
            node_uid: self.node_uid.clone(),
            max_expiration_seconds: 86_400,
            annotations: Vec::new(),
            key: TestKey::generate(kind)?,
            tamper_proof: false,
        })
    }

    /// Creates the request; returns its stored JSON.
    pub fn create(&self, request: &RequestBuilder) -> anyhow::Result<Value> {
        Ok(self.server.create(&request.json())?)
    }

    /// The stored request.
    pub fn request(&self, namespace: &str, name: &str) -> Option<Value> {
        self.server
            .get(PCR_API, "PodCertificateRequest", Some(namespace), name)
    }

    /// Waits for the request's terminal condition; returns the object.
    pub async fn answered(&self, namespace: &str, name: &str) -> anyhow::Result<Value> {
        wait_for(
            &format!("an answer to {namespace}/{name}"),
            Duration::from_secs(15),
            || {
                self.request(namespace, name)
                    .is_some_and(|r| condition(&r).is_some())
            },
        )
        .await?;
        self.request(namespace, name).context("request gone")
    }

    /// The published bundle of `SIGNER`.
    pub fn bundle(&self) -> Option<Value> {
        self.server.get(
            CTB_API,
            "ClusterTrustBundle",
            None,
            "credlet.io:pods:credlet",
        )
    }

    /// Runtime settings: v1beta1, one Lease with short timings named
    /// `identity`, bundles re-checked every 200 ms.
    pub fn settings(&self, identity: &str) -> SignerRuntimeSettings {
        let mut signer = SignerSettings::new(vec![SIGNER.to_owned()], identity);
        signer.api_version = ApiVersionChoice::Fixed(ApiVersion::V1beta1);
        signer.workers = 4;
        signer.backoff = Duration::from_millis(20);
        let mut lease = LeaseSettings::new("credlet", "credlet-signer", identity);
        lease.lease_duration = Duration::from_secs(2);
        lease.renew_deadline = Duration::from_millis(1500);
        lease.retry_period = Duration::from_millis(200);
        let mut publisher = PublisherSettings::new(vec![SIGNER.to_owned()]);
        publisher.resync = Duration::from_millis(200);
        SignerRuntimeSettings {
            signer,
            lease: Some(lease),
            publisher: Some(publisher),
        }
    }

    /// Starts a signer replica.
    pub async fn start(
        &self,
        settings: SignerRuntimeSettings,
        metrics: SignerMetrics,
    ) -> anyhow::Result<SignerRuntime> {
        Ok(SignerRuntime::start(
            self.server.kube_client()?,
            Arc::clone(&self.keys),
            Arc::clone(&self.policy),
            settings,
            metrics,
        )
        .await?)
    }

    /// Successful status writes to one request.
    pub fn status_writes(&self, namespace: &str, name: &str) -> usize {
        let path = format!(
            "/apis/certificates.k8s.io/v1beta1/namespaces/{namespace}/podcertificaterequests/{name}/status"
        );
        self.server
            .requests()
            .iter()
            .filter(|r| r.path == path && r.method != "GET" && r.status < 300)
            .count()
    }
}

fn uid(object: &Value) -> anyhow::Result<String> {
    object
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .context("no uid")
}

/// Writes a fresh self-signed CA to `dir/ca.crt` and `dir/ca.key`.
fn write_ca(dir: &Path) -> anyhow::Result<KeyFiles> {
    let (_, cert, key) = Authority::generate_self_signed_with_pems(Policy::new(TRUST_DOMAIN))?;
    let files = KeyFiles {
        cert: dir.join("ca.crt"),
        key: dir.join("ca.key"),
        chain: None,
    };
    std::fs::write(&files.cert, cert)?;
    std::fs::write(&files.key, key.as_bytes())?;
    Ok(files)
}

/// The request's single condition `(type, reason)`, if it has one with
/// status True.
pub fn condition(request: &Value) -> Option<(String, String)> {
    let conditions = request.pointer("/status/conditions")?.as_array()?;
    let c = conditions.iter().find(|c| c["status"] == "True")?;
    Some((
        c["type"].as_str()?.to_owned(),
        c["reason"].as_str()?.to_owned(),
    ))
}

/// A PodCertificateRequest as the kubelet would create it.
#[derive(Clone)]
pub struct RequestBuilder {
    pub namespace: String,
    pub name: String,
    pub signer: String,
    pub pod: String,
    pub pod_uid: String,
    pub service_account: String,
    pub service_account_uid: String,
    pub node: String,
    pub node_uid: String,
    pub max_expiration_seconds: i64,
    pub annotations: Vec<(String, String)>,
    pub key: Arc<TestKey>,
    pub tamper_proof: bool,
}

impl RequestBuilder {
    pub fn json(&self) -> Value {
        let mut proof = self.key.sign(self.pod_uid.as_bytes());
        if self.tamper_proof {
            let last = proof.len() - 1;
            proof[last] ^= 0x01;
        }
        let mut spec = json!({
            "signerName": self.signer,
            "podName": self.pod,
            "podUID": self.pod_uid,
            "serviceAccountName": self.service_account,
            "serviceAccountUID": self.service_account_uid,
            "nodeName": self.node,
            "nodeUID": self.node_uid,
            "maxExpirationSeconds": self.max_expiration_seconds,
            "pkixPublicKey": STANDARD.encode(&self.key.spki),
            "proofOfPossession": STANDARD.encode(&proof),
        });
        if !self.annotations.is_empty() {
            let map: serde_json::Map<String, Value> = self
                .annotations
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect();
            spec["unverifiedUserAnnotations"] = Value::Object(map);
        }
        json!({
            "apiVersion": PCR_API,
            "kind": "PodCertificateRequest",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": spec,
        })
    }
}

/// Key types the tests use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    P256,
    P384,
    P521,
    Ed25519,
    Rsa2048,
    Rsa3072,
    Rsa4096,
}

impl KeyKind {
    /// Every type the API defines.
    pub const SUPPORTED: [KeyKind; 6] = [
        KeyKind::P256,
        KeyKind::P384,
        KeyKind::P521,
        KeyKind::Ed25519,
        KeyKind::Rsa3072,
        KeyKind::Rsa4096,
    ];
}

enum Signing {
    P256(sig::EcdsaKeyPair),
    P384(p384::ecdsa::SigningKey),
    P521(p521::ecdsa::SigningKey),
    Ed25519(sig::Ed25519KeyPair),
    Rsa(sig::RsaKeyPair),
}

/// A private key and its SubjectPublicKeyInfo.
pub struct TestKey {
    pub kind: KeyKind,
    pub spki: Vec<u8>,
    signing: Signing,
}

const SPKI_P256: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
const SPKI_P384: &[u8] = &[
    0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b,
    0x81, 0x04, 0x00, 0x22, 0x03, 0x62, 0x00,
];
const SPKI_P521: &[u8] = &[
    0x30, 0x81, 0x9b, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05,
    0x2b, 0x81, 0x04, 0x00, 0x23, 0x03, 0x81, 0x86, 0x00,
];
const SPKI_ED25519: &[u8] = &[
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

fn der_len(len: usize) -> Vec<u8> {
    match len {
        0..=0x7f => vec![len as u8],
        0x80..=0xff => vec![0x81, len as u8],
        _ => vec![0x82, (len >> 8) as u8, len as u8],
    }
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend(der_len(content.len()));
    out.extend_from_slice(content);
    out
}

fn der_uint(bytes: &[u8]) -> Vec<u8> {
    let mut v: Vec<u8> = bytes.iter().copied().skip_while(|b| *b == 0).collect();
    if v.first().is_none_or(|b| b & 0x80 != 0) {
        v.insert(0, 0);
    }
    der(0x02, &v)
}

/// ECDSA `(r, s)` as the ASN.1 DER signature Go and OpenSSL produce.
fn ecdsa_der(r: &[u8], s: &[u8]) -> Vec<u8> {
    let mut body = der_uint(r);
    body.extend(der_uint(s));
    der(0x30, &body)
}

fn testdata(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/testdata")
        .join(file)
}

fn rsa_key(file: &str) -> anyhow::Result<sig::RsaKeyPair> {
    let pem = std::fs::read_to_string(testdata(file))?;
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = STANDARD.decode(b64)?;
    sig::RsaKeyPair::from_pkcs8(&der).map_err(|e| anyhow::anyhow!("RSA test key {file}: {e}"))
}

/// ring's system RNG for RustCrypto signing (P-521 has no deterministic
/// signer without the `getrandom` feature).
struct RingRng;

impl p521::elliptic_curve::rand_core::RngCore for RingRng {
    fn next_u32(&mut self) -> u32 {
        u32::from_le_bytes(random::<4>())
    }

    fn next_u64(&mut self) -> u64 {
        u64::from_le_bytes(random::<8>())
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        SystemRandom::new().fill(dest).expect("random");
    }

    fn try_fill_bytes(
        &mut self,
        dest: &mut [u8],
    ) -> Result<(), p521::elliptic_curve::rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl p521::elliptic_curve::rand_core::CryptoRng for RingRng {}

fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    SystemRandom::new().fill(&mut bytes).expect("random");
    bytes
}

impl TestKey {
    /// A new key (RSA keys come from `tests/testdata`: generating them in a
    /// debug build takes too long).
    pub fn generate(kind: KeyKind) -> anyhow::Result<Arc<Self>> {
        let rng = SystemRandom::new();
        let with_prefix = |prefix: &[u8], point: &[u8]| {
            let mut spki = prefix.to_vec();
            spki.extend_from_slice(point);
            spki
        };
        let (spki, signing) = match kind {
            KeyKind::P256 => {
                let alg = &sig::ECDSA_P256_SHA256_ASN1_SIGNING;
                let pkcs8 = sig::EcdsaKeyPair::generate_pkcs8(alg, &rng)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                let pair = sig::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                (
                    with_prefix(SPKI_P256, pair.public_key().as_ref()),
                    Signing::P256(pair),
                )
            }
            KeyKind::P384 => {
                let key = loop {
                    if let Ok(key) = p384::ecdsa::SigningKey::from_slice(&random::<48>()) {
                        break key;
                    }
                };
                let point = key.verifying_key().to_encoded_point(false);
                (with_prefix(SPKI_P384, point.as_bytes()), Signing::P384(key))
            }
            KeyKind::P521 => {
                let key = loop {
                    let mut bytes = random::<66>();
                    bytes[0] &= 0x01;
                    if let Ok(key) = p521::ecdsa::SigningKey::from_slice(&bytes) {
                        break key;
                    }
                };
                let point = p521::ecdsa::VerifyingKey::from(&key).to_encoded_point(false);
                (with_prefix(SPKI_P521, point.as_bytes()), Signing::P521(key))
            }
            KeyKind::Ed25519 => {
                let pkcs8 = sig::Ed25519KeyPair::generate_pkcs8(&rng)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                let pair = sig::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                (
                    with_prefix(SPKI_ED25519, pair.public_key().as_ref()),
                    Signing::Ed25519(pair),
                )
            }
            KeyKind::Rsa2048 | KeyKind::Rsa3072 | KeyKind::Rsa4096 => {
                let file = match kind {
                    KeyKind::Rsa2048 => "rsa2048.pk8.pem",
                    KeyKind::Rsa3072 => "rsa3072.pk8.pem",
                    _ => "rsa4096.pk8.pem",
                };
                let pair = rsa_key(file)?;
                // SEQUENCE { SEQUENCE { rsaEncryption, NULL }, BIT STRING }
                let alg = [
                    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
                    0x05, 0x00,
                ];
                let mut bits = vec![0u8];
                bits.extend_from_slice(pair.public().as_ref());
                let mut body = alg.to_vec();
                body.extend(der(0x03, &bits));
                (der(0x30, &body), Signing::Rsa(pair))
            }
        };
        Ok(Arc::new(Self {
            kind,
            spki,
            signing,
        }))
    }

    /// The proof of possession over `message` as the kubelet makes it:
    /// ECDSA over SHA-256 (ASN.1), Ed25519, RSA-PSS with SHA-256.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        use p384::ecdsa::signature::hazmat::PrehashSigner;
        let rng = SystemRandom::new();
        let sha256 = ring::digest::digest(&ring::digest::SHA256, message);
        match &self.signing {
            Signing::P256(pair) => pair.sign(&rng, message).expect("sign").as_ref().to_vec(),
            Signing::P384(key) => {
                let s: p384::ecdsa::Signature = key.sign_prehash(sha256.as_ref()).expect("sign");
                let (r, s) = s.split_bytes();
                ecdsa_der(&r, &s)
            }
            Signing::P521(key) => {
                // The digest as an integer, as Go uses it on P-521.
                let mut padded = [0u8; 66];
                padded[66 - 32..].copy_from_slice(sha256.as_ref());
                use p521::ecdsa::signature::hazmat::RandomizedPrehashSigner;
                let s: p521::ecdsa::Signature = key
                    .sign_prehash_with_rng(&mut RingRng, &padded)
                    .expect("sign");
                let (r, s) = s.split_bytes();
                ecdsa_der(&r, &s)
            }
            Signing::Ed25519(pair) => pair.sign(message).as_ref().to_vec(),
            Signing::Rsa(pair) => {
                let mut out = vec![0u8; pair.public().modulus_len()];
                pair.sign(&sig::RSA_PSS_SHA256, &rng, message, &mut out)
                    .expect("sign");
                out
            }
        }
    }
}
