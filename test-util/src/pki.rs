//! A throwaway CA for the harness: one root, leaf certificates for 127.0.0.1.
//!
//! Go's TLS stack (registry, containerd, skopeo) and rustls both accept a
//! proper CA → leaf chain; a self-signed leaf used as its own root works in
//! Go but not in webpki, so everything here is issued by a small root.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A name every [`TestCa::server_leaf`] also carries. It resolves nowhere:
/// tests reach a registry by it only through something that maps it to
/// loopback (an HTTP proxy of the test's own, a `hosts.toml` mirror).
pub const TEST_SERVER_NAME: &str = "registry.credlet.test";

/// A root CA whose certificate the harness hands to every client.
pub struct TestCa {
    cert_pem: String,
    cert_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// A leaf certificate and its key, issued by a [`TestCa`].
#[derive(Clone)]
pub struct Leaf {
    /// PEM of the leaf certificate alone.
    pub cert_pem: String,
    /// DER of the leaf certificate.
    pub cert_der: Vec<u8>,
    /// PKCS#8 PEM of the private key (ECDSA P-256).
    pub key_pem: String,
    /// PKCS#8 DER of the private key.
    pub key_pkcs8_der: Vec<u8>,
}

impl std::fmt::Debug for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leaf").finish_non_exhaustive()
    }
}

impl TestCa {
    /// Generates a fresh root CA (ECDSA P-256).
    pub fn new(common_name: &str) -> Result<Self> {
        let key = KeyPair::generate().context("generate CA key")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).context("self-sign CA")?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The root certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The root certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// A TLS server certificate for `127.0.0.1`, `localhost` and
    /// [`TEST_SERVER_NAME`].
    pub fn server_leaf(&self, common_name: &str) -> Result<Leaf> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.subject_alt_names = vec![
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            SanType::DnsName("localhost".try_into()?),
            SanType::DnsName(TEST_SERVER_NAME.try_into()?),
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A certificate for signing registry bearer tokens (JWS `x5c`).
    ///
    /// It carries no extended key usage: distribution verifies the `x5c`
    /// chain with Go's default options, which accept a leaf without EKU.
    pub fn token_signing_leaf(&self, common_name: &str) -> Result<Leaf> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Result<Leaf> {
        let key = KeyPair::generate().context("generate leaf key")?;
        let cert = params.signed_by(&key, &self.issuer).context("sign leaf")?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key_pem: key.serialize_pem(),
            key_pkcs8_der: key.serialize_der(),
        })
    }
}

impl Leaf {
    /// A rustls server config presenting this leaf (ring provider, HTTP/1.1 only).
    pub(crate) fn rustls_server_config(&self) -> Result<rustls::ServerConfig> {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(self.cert_der.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8_der.clone())),
            )?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// A rustls client config trusting only `ca_der` (ring provider, HTTP/1.1).
pub fn rustls_client_config(ca_der: &[u8]) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec()))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
