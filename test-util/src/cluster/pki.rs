//! The cluster's PKI, written as files the programs read: one cluster CA,
//! the API server's serving certificate, client certificates for the
//! components and the admin, the kubelet's serving certificate, and the
//! service-account signing key.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The committed 2048-bit RSA test key: the API server signs service
/// account tokens with RS256, as kubeadm clusters do.
const SERVICE_ACCOUNT_KEY: &[u8] = include_bytes!("../../testdata/service-account-rsa-2048.pk8");

/// A certificate and key on disk.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM PKCS#8 key.
    pub key: PathBuf,
}

/// Every PKI file of a cluster.
#[derive(Debug, Clone)]
pub struct ClusterPki {
    /// The cluster CA certificate (clients' and servers' trust root).
    pub ca_cert: PathBuf,
    /// kube-apiserver serving.
    pub apiserver: CertFiles,
    /// kube-apiserver → kubelet client.
    pub apiserver_kubelet_client: CertFiles,
    /// `admin` in `system:masters`.
    pub admin: CertFiles,
    /// `system:kube-controller-manager`.
    pub controller_manager: CertFiles,
    /// `system:kube-scheduler`.
    pub scheduler: CertFiles,
    /// `system:node:<node>` in `system:nodes`.
    pub kubelet_client: CertFiles,
    /// The kubelet's serving certificate (IP SAN: the node address).
    pub kubelet_serving: CertFiles,
    /// Service account signing key (PKCS#8 PEM, RSA 2048).
    pub service_account_key: PathBuf,
    /// The cluster CA's PEM.
    pub ca_pem: String,
}

struct Ca {
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn issue(
        &self,
        dir: &Path,
        name: &str,
        common_name: &str,
        organization: Option<&str>,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<CertFiles> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        if let Some(o) = organization {
            params.distinguished_name.push(DnType::OrganizationName, o);
        }
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.subject_alt_names = sans;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().context("generate key")?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("sign {name}"))?;
        let files = CertFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        fs::write(&files.cert, cert.pem())?;
        write_private(&files.key, key.serialize_pem().as_bytes())?;
        Ok(files)
    }
}

fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    f.write_all(data)?;
    Ok(())
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

impl ClusterPki {
    /// Generates everything into `dir` for a node named `node` at `node_ip`.
    pub fn generate(dir: &Path, node: &str, node_ip: IpAddr) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let key = KeyPair::generate().context("generate cluster CA key")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "credlet test cluster CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).context("self-sign cluster CA")?;
        let ca_pem = cert.pem();
        let ca_cert = dir.join("ca.crt");
        fs::write(&ca_cert, &ca_pem)?;
        let ca = Ca {
            issuer: Issuer::new(params, key),
        };
        let dns = |n: &str| -> Result<SanType> { Ok(SanType::DnsName(n.try_into()?)) };
        let loopback = IpAddr::from([127, 0, 0, 1]);
        let server = ExtendedKeyUsagePurpose::ServerAuth;
        let client = ExtendedKeyUsagePurpose::ClientAuth;
        let apiserver = ca.issue(
            dir,
            "apiserver",
            "kube-apiserver",
            None,
            vec![
                SanType::IpAddress(loopback),
                dns("localhost")?,
                dns("kubernetes")?,
                dns("kubernetes.default")?,
                dns("kubernetes.default.svc")?,
                dns("kubernetes.default.svc.cluster.local")?,
            ],
            server.clone(),
        )?;
        let service_account_key = dir.join("service-account.key");
        write_private(
            &service_account_key,
            pem("PRIVATE KEY", SERVICE_ACCOUNT_KEY).as_bytes(),
        )?;
        Ok(Self {
            apiserver,
            apiserver_kubelet_client: ca.issue(
                dir,
                "apiserver-kubelet-client",
                "kube-apiserver-kubelet-client",
                Some("system:masters"),
                vec![],
                client.clone(),
            )?,
            admin: ca.issue(
                dir,
                "admin",
                "admin",
                Some("system:masters"),
                vec![],
                client.clone(),
            )?,
            controller_manager: ca.issue(
                dir,
                "controller-manager",
                "system:kube-controller-manager",
                None,
                vec![],
                client.clone(),
            )?,
            scheduler: ca.issue(
                dir,
                "scheduler",
                "system:kube-scheduler",
                None,
                vec![],
                client.clone(),
            )?,
            kubelet_client: ca.issue(
                dir,
                "kubelet-client",
                &format!("system:node:{node}"),
                Some("system:nodes"),
                vec![],
                client,
            )?,
            kubelet_serving: ca.issue(
                dir,
                "kubelet-serving",
                node,
                None,
                vec![SanType::IpAddress(node_ip)],
                server,
            )?,
            service_account_key,
            ca_cert,
            ca_pem,
        })
    }
}

/// Writes a kubeconfig for `user` against `server`.
pub fn write_kubeconfig(path: &Path, server: &str, ca: &Path, user: &CertFiles) -> Result<()> {
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "credlet-test", "cluster": {
            "server": server,
            "certificate-authority": ca,
        }}],
        "users": [{"name": "user", "user": {
            "client-certificate": user.cert,
            "client-key": user.key,
        }}],
        "contexts": [{"name": "credlet-test", "context": {"cluster": "credlet-test", "user": "user"}}],
        "current-context": "credlet-test",
    });
    // JSON is YAML: every program here reads either.
    fs::write(path, serde_json::to_string_pretty(&doc)?)?;
    Ok(())
}
