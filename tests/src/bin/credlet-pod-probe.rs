//! A small program the Kubernetes tests run inside pods (packed into an
//! image by the harness), to see a credlet volume as a workload does.
//!
//! - `credlet-pod-probe check <dir> [--every <secs>]`: reads `tls.key`,
//!   `tls.crt` and `ca.crt` from the volume, checks that the key matches
//!   the leaf and the leaf chains to the bundle, and prints one JSON line
//!   (leaf PEM, serial, URI/DNS/IP SANs, key match, chain check); with
//!   `--every`, again whenever the leaf changes.
//! - `credlet-pod-probe serve <dir> <addr>`: a TLS server that requires a
//!   client certificate chaining to the volume's bundle; prints a JSON line
//!   per handshake with the client's URI SANs and answers its own.
//! - `credlet-pod-probe connect <dir> <addr> <server-name>`: connects with
//!   the volume's certificate, verifies the server against the bundle and
//!   the name, prints the server's URI SANs and what it answered.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use rustls::sign::CertifiedKey;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("credlet-pod-probe: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("credlet-pod-probe: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &[String]) -> Result<()> {
    let arg = |i: usize| args.get(i).map(String::as_str).context("missing argument");
    match arg(0)? {
        "check" => {
            let dir = PathBuf::from(arg(1)?);
            let every = match (args.get(2).map(String::as_str), args.get(3)) {
                (Some("--every"), Some(s)) => Some(Duration::from_secs(s.parse()?)),
                _ => None,
            };
            let mut last = String::new();
            loop {
                match check(&dir) {
                    Ok(report) => {
                        let serial = report["serial"].as_str().unwrap_or_default().to_string();
                        if serial != last {
                            println!("{report}");
                            last = serial;
                        }
                    }
                    Err(e) => println!("{}", json!({"error": format!("{e:#}")})),
                }
                match every {
                    Some(d) => tokio::time::sleep(d).await,
                    None => return Ok(()),
                }
            }
        }
        "serve" => serve(Path::new(arg(1)?), arg(2)?).await,
        "connect" => connect(Path::new(arg(1)?), arg(2)?, arg(3)?).await,
        other => bail!("unknown command {other:?} (check, serve, connect)"),
    }
}

struct Volume {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: rustls::RootCertStore,
    bundle: Vec<CertificateDer<'static>>,
}

fn load(dir: &Path) -> Result<Volume> {
    let chain = CertificateDer::pem_file_iter(dir.join("tls.crt"))
        .context("read tls.crt")?
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(dir.join("tls.key")).context("read tls.key")?;
    let bundle = CertificateDer::pem_file_iter(dir.join("ca.crt"))
        .context("read ca.crt")?
        .collect::<Result<Vec<_>, _>>()?;
    let mut roots = rustls::RootCertStore::empty();
    for c in &bundle {
        roots.add(c.clone())?;
    }
    if chain.is_empty() {
        bail!("tls.crt holds no certificate");
    }
    Ok(Volume {
        chain,
        key,
        roots,
        bundle,
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn sans(der: &[u8]) -> Result<serde_json::Value> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).context("parse the leaf")?;
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::URI(u) => uris.push(u.to_string()),
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                GeneralName::IPAddress(b) => ips.push(match b.len() {
                    4 => std::net::IpAddr::from(<[u8; 4]>::try_from(*b)?).to_string(),
                    16 => std::net::IpAddr::from(<[u8; 16]>::try_from(*b)?).to_string(),
                    _ => format!("{b:?}"),
                }),
                _ => {}
            }
        }
    }
    Ok(json!({
        "serial": cert.raw_serial_as_string(),
        "uris": uris,
        "dns": dns,
        "ips": ips,
        "not_before": cert.validity().not_before.timestamp(),
        "not_after": cert.validity().not_after.timestamp(),
        "subject": cert.subject().to_string(),
    }))
}

fn check(dir: &Path) -> Result<serde_json::Value> {
    let v = load(dir)?;
    let signing = provider()
        .key_provider
        .load_private_key(v.key.clone_key())
        .context("load tls.key")?;
    let key_match = CertifiedKey::new(v.chain.clone(), signing)
        .keys_match()
        .map(|()| true)
        .unwrap_or(false);
    // The chain must verify as a client certificate against the bundle.
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(v.roots.clone()),
        provider(),
    )
    .build()?;
    let chain_ok = verifier
        .verify_client_cert(
            &v.chain[0],
            &v.chain[1..],
            rustls::pki_types::UnixTime::now(),
        )
        .map(|_| true)
        .unwrap_or(false);
    let mut report = sans(&v.chain[0])?;
    report["key_match"] = json!(key_match);
    report["chain_ok"] = json!(chain_ok);
    report["bundle_len"] = json!(v.bundle.len());
    report["leaf_pem"] = json!(pem("CERTIFICATE", &v.chain[0]));
    report["key_type"] = json!(match &v.key {
        PrivateKeyDer::Pkcs8(_) => "pkcs8",
        PrivateKeyDer::Sec1(_) => "sec1",
        PrivateKeyDer::Pkcs1(_) => "pkcs1",
        _ => "other",
    });
    Ok(report)
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

async fn serve(dir: &Path, addr: &str) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen on {addr}"))?;
    println!("{}", json!({"listening": addr}));
    loop {
        let (tcp, _) = listener.accept().await?;
        // The files are read per connection: a rotation is served at once.
        let result = async {
            let v = load(dir)?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(v.roots),
                provider(),
            )
            .build()?;
            let config = rustls::ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_client_cert_verifier(verifier)
                .with_single_cert(v.chain.clone(), v.key)?;
            let mut tls = tokio_rustls::TlsAcceptor::from(Arc::new(config))
                .accept(tcp)
                .await?;
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .context("no client certificate")?
                .clone();
            let peer = sans(&peer)?;
            let mine = sans(&v.chain[0])?;
            tls.write_all(format!("{}\n", json!({"server": mine["uris"]})).as_bytes())
                .await?;
            tls.shutdown().await?;
            anyhow::Ok(peer)
        }
        .await;
        match result {
            Ok(peer) => println!("{}", json!({"handshake": "ok", "client": peer})),
            Err(e) => println!(
                "{}",
                json!({"handshake": "failed", "error": format!("{e:#}")})
            ),
        }
    }
}

async fn connect(dir: &Path, addr: &str, server_name: &str) -> Result<()> {
    let v = load(dir)?;
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(v.roots)
        .with_client_auth_cert(v.chain, v.key)?;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to {addr}"))?;
    let name = ServerName::try_from(server_name.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .context("TLS handshake")?;
    let server = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .context("no server certificate")?
        .clone();
    let mut answer = String::new();
    tls.read_to_string(&mut answer).await?;
    println!(
        "{}",
        json!({"handshake": "ok", "server": sans(&server)?, "answer": answer.trim()})
    );
    Ok(())
}
