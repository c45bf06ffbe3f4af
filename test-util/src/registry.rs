//! A real CNCF distribution registry (`docker-registry`, 2.8) on
//! 127.0.0.1 with TLS (or plain HTTP), behind htpasswd (bcrypt) or token
//! auth.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::pki::TestCa;
use crate::process::{Daemon, WorkDir, free_port, run};
use crate::token::{Grant, TOKEN_ISSUER, TOKEN_SERVICE, TokenRequest, TokenServer};

/// How the registry authenticates.
#[derive(Debug)]
pub enum RegistryAuth {
    /// `auth: htpasswd`: 401 with `WWW-Authenticate: Basic realm=…`.
    Basic,
    /// `auth: token`: 401 with `WWW-Authenticate: Bearer realm,service,scope`;
    /// the harness serves the token endpoint.
    Token(TokenServer),
}

/// One line of the registry's access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogEntry {
    /// HTTP method.
    pub method: String,
    /// Request path (with query).
    pub path: String,
    /// Status answered.
    pub status: u16,
}

/// A running registry; killed and its directory removed on drop.
#[derive(Debug)]
pub struct Registry {
    // Field order matters for drop: daemon before its directory.
    daemon: Daemon,
    auth: RegistryAuth,
    addr: SocketAddr,
    ca: TestCa,
    config: PathBuf,
    cert_dir: PathBuf,
    log: PathBuf,
    users: Vec<(String, String)>,
    plain_http: bool,
    dir: WorkDir,
}

impl Registry {
    /// A registry with `auth: htpasswd`; every request needs one of `users`
    /// (name, password). Passwords are bcrypt-hashed with `htpasswd -B`.
    pub fn start_basic_auth(users: &[(&str, &str)]) -> Result<Self> {
        Self::start_basic(users, true)
    }

    /// Like [`Registry::start_basic_auth`], serving plain HTTP (no TLS):
    /// what a `hosts.toml` `http://` host points at.
    pub fn start_basic_auth_plain_http(users: &[(&str, &str)]) -> Result<Self> {
        Self::start_basic(users, false)
    }

    fn start_basic(users: &[(&str, &str)], tls: bool) -> Result<Self> {
        let dir = WorkDir::new("registry")?;
        let htpasswd = dir.path().join("htpasswd");
        let mut lines = String::new();
        for (user, pass) in users {
            let out = run(Command::new("htpasswd").args(["-B", "-b", "-n", user, pass]))?;
            lines.push_str(String::from_utf8(out.stdout)?.trim());
            lines.push('\n');
        }
        fs::write(&htpasswd, lines)?;
        let auth_yaml = format!(
            "auth:\n  htpasswd:\n    realm: credlet-test-registry\n    path: {}\n",
            htpasswd.display()
        );
        let ca = TestCa::new("credlet test registry CA")?;
        Self::launch(dir, users, auth_yaml, ca, RegistryAuth::Basic, tls)
    }

    /// A registry with `auth: token` backed by a token endpoint of the harness.
    /// `users` authenticate at the token endpoint; `grants` say which
    /// repositories each may pull/push ([`crate::ANYONE`] grants to every
    /// requester, anonymous included). Unknown users get 401 from the token
    /// endpoint; known users without a grant get a 200 token with empty
    /// access, and then 401 from the registry.
    pub fn start_token_auth(users: &[(&str, &str)], grants: &[Grant]) -> Result<Self> {
        let dir = WorkDir::new("registry")?;
        let bundle = dir.path().join("token-ca.pem");
        let ca = TestCa::new("credlet test registry CA")?;
        // The token endpoint's TLS certificate comes from the registry's CA,
        // so one `ca` in hosts.toml / one --cert-dir covers both.
        let tls_leaf = ca.server_leaf("credlet test token endpoint")?;
        let signing = ca.token_signing_leaf("credlet test token signer")?;
        let server = TokenServer::start(users, grants, &tls_leaf, &signing)?;
        fs::write(&bundle, ca.cert_pem())?;
        let auth_yaml = format!(
            "auth:\n  token:\n    realm: {}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
            server.realm(),
            bundle.display()
        );
        Self::launch(dir, users, auth_yaml, ca, RegistryAuth::Token(server), true)
    }

    fn launch(
        dir: WorkDir,
        users: &[(&str, &str)],
        auth_yaml: String,
        ca: TestCa,
        auth: RegistryAuth,
        tls: bool,
    ) -> Result<Self> {
        let leaf = ca.server_leaf("credlet test registry")?;
        let cert = dir.path().join("tls.crt");
        let key = dir.path().join("tls.key");
        fs::write(&cert, &leaf.cert_pem)?;
        fs::write(&key, &leaf.key_pem)?;
        // A directory with only `ca.crt`: skopeo's --dest-cert-dir and the
        // file containerd's hosts.toml names as `ca`.
        let cert_dir = dir.path().join("certs");
        fs::create_dir_all(&cert_dir)?;
        fs::write(cert_dir.join("ca.crt"), ca.cert_pem())?;
        let storage = dir.path().join("storage");
        fs::create_dir_all(&storage)?;

        let config = dir.path().join("config.yml");
        let log = dir.path().join("registry.log");
        let mut secret = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .map_err(|_| anyhow::anyhow!("rng"))?;
        let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();

        // The port is picked, released and handed to the registry: retry if
        // something else grabbed it in between.
        let mut last_err = None;
        for _attempt in 0..5 {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
            let tls_yaml = if tls {
                format!(
                    "  tls:\n    certificate: {}\n    key: {}\n",
                    cert.display(),
                    key.display()
                )
            } else {
                String::new()
            };
            let yaml = format!(
                "version: 0.1\n\
                 log:\n  level: info\n  formatter: text\n\
                 storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n  secret: {secret}\n{tls_yaml}\
                 health:\n  storagedriver:\n    enabled: false\n\
                 {auth_yaml}",
                storage = storage.display(),
            );
            fs::write(&config, yaml)?;
            let mut daemon = spawn_registry(&config, &log)?;
            match daemon.wait_for_tcp(addr, Duration::from_secs(20)) {
                Ok(()) => {
                    return Ok(Self {
                        daemon,
                        auth,
                        addr,
                        ca,
                        config,
                        cert_dir,
                        log,
                        users: users
                            .iter()
                            .map(|(u, p)| (u.to_string(), p.to_string()))
                            .collect(),
                        plain_http: !tls,
                        dir,
                    });
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("registry did not start")))
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:<port>`, the host part of image references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Whether the registry serves plain HTTP.
    pub fn is_plain_http(&self) -> bool {
        self.plain_http
    }

    /// `https://127.0.0.1:<port>` (`http://` for a plain-HTTP registry).
    pub fn url(&self) -> String {
        let scheme = if self.plain_http { "http" } else { "https" };
        format!("{scheme}://{}", self.addr)
    }

    /// `127.0.0.1:<port>/<repo>:<tag>`.
    pub fn image_ref(&self, repo: &str, tag: &str) -> String {
        format!("{}/{repo}:{tag}", self.addr)
    }

    /// The CA certificate (PEM) that signed the registry's (and the token
    /// endpoint's) TLS certificate.
    pub fn ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// The CA certificate, DER.
    pub fn ca_der(&self) -> &[u8] {
        self.ca.cert_der()
    }

    /// Path of the CA certificate PEM (`<cert_dir>/ca.crt`).
    pub fn ca_pem_path(&self) -> PathBuf {
        self.cert_dir.join("ca.crt")
    }

    /// A directory holding only `ca.crt`: usable as skopeo's
    /// `--dest-cert-dir`/`--src-cert-dir` and as containerd's certs.d content.
    pub fn cert_dir(&self) -> &Path {
        &self.cert_dir
    }

    /// The users given at start.
    pub fn users(&self) -> &[(String, String)] {
        &self.users
    }

    /// The auth mode (and the token server, for token registries).
    pub fn auth(&self) -> &RegistryAuth {
        &self.auth
    }

    /// Replaces a token registry's grants (e.g. a public repository turns
    /// private). Panics on an htpasswd registry, which has none.
    pub fn set_grants(&self, grants: &[crate::Grant]) {
        match &self.auth {
            RegistryAuth::Token(t) => t.set_grants(grants),
            RegistryAuth::Basic => panic!("an htpasswd registry has no grants to change"),
        }
    }

    /// Requests the token endpoint answered (empty for htpasswd registries).
    pub fn token_requests(&self) -> Vec<TokenRequest> {
        match &self.auth {
            RegistryAuth::Token(t) => t.requests(),
            RegistryAuth::Basic => Vec::new(),
        }
    }

    /// The registry's log file (application log and access log).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The registry's working directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Requests in the registry's access log so far, oldest first.
    pub fn access_log(&self) -> Vec<AccessLogEntry> {
        parse_access_log(&fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// Stops the registry process (connections are refused until
    /// [`Registry::restart`]); storage and config are kept.
    pub fn stop(&mut self) {
        self.daemon.stop();
    }

    /// Starts the registry again on the same address with the same storage.
    pub fn restart(&mut self) -> Result<()> {
        self.daemon.stop();
        let mut daemon = spawn_registry(&self.config, &self.log)?;
        daemon
            .wait_for_tcp(self.addr, Duration::from_secs(20))
            .context("registry restart (port taken meanwhile?)")?;
        self.daemon = daemon;
        Ok(())
    }

    /// Freezes the registry process (SIGSTOP): connections are accepted by
    /// the kernel but never answered, as with a registry that hangs, until
    /// [`Registry::resume`].
    pub fn pause(&self) {
        self.signal(rustix::process::Signal::STOP);
    }

    /// Lets a paused registry run again (SIGCONT).
    pub fn resume(&self) {
        self.signal(rustix::process::Signal::CONT);
    }

    fn signal(&self, signal: rustix::process::Signal) {
        if let Some(pid) = self
            .daemon
            .pid()
            .and_then(|p| rustix::process::Pid::from_raw(p as i32))
        {
            let _ = rustix::process::kill_process(pid, signal);
        }
    }

    /// Fails with the log tail if the registry process died.
    pub fn check_running(&mut self) -> Result<()> {
        self.daemon.check_running()
    }
}

fn spawn_registry(config: &Path, log: &Path) -> Result<Daemon> {
    let mut cmd = Command::new("docker-registry");
    cmd.arg("serve").arg(config);
    // Do not inherit REGISTRY_* overrides from the environment.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("REGISTRY_") {
            cmd.env_remove(k);
        }
    }
    let d = Daemon::spawn("docker-registry", cmd, log, None)?;
    if d.pid().is_none() {
        bail!("docker-registry did not start");
    }
    Ok(d)
}

/// Parses combined-log-format lines: `… "METHOD PATH PROTO" STATUS …`.
fn parse_access_log(text: &str) -> Vec<AccessLogEntry> {
    text.lines()
        .filter(|l| !l.starts_with("time="))
        .filter_map(|l| {
            let start = l.find('"')?;
            let rest = &l[start + 1..];
            let end = rest.find('"')?;
            let mut req = rest[..end].split(' ');
            let method = req.next()?.to_string();
            let path = req.next()?.to_string();
            let status = rest[end + 1..].split_whitespace().next()?.parse().ok()?;
            Some(AccessLogEntry {
                method,
                path,
                status,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_log_lines() {
        let text = "time=\"2026\" level=info msg=\"x\"\n\
            127.0.0.1 - - [27/Nov/2026:11:04:11 +0000] \"HEAD /v2/a/manifests/sha256:1 HTTP/2.0\" 401 87 \"\" \"curl/7.88.1\"\n";
        assert_eq!(
            parse_access_log(text),
            vec![AccessLogEntry {
                method: "HEAD".into(),
                path: "/v2/a/manifests/sha256:1".into(),
                status: 401
            }]
        );
    }
}
