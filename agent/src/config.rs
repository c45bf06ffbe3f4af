//! Command-line and environment configuration, validated before anything
//! starts. Invalid configuration exits with code 64 (`EX_USAGE`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::logging::LogFormat;

/// Exit code for invalid configuration (`EX_USAGE` from sysexits.h).
pub const EXIT_CONFIG: u8 = 64;

/// credlet: pod certificates and pull-credential verification for
/// Kubernetes nodes.
#[derive(Debug, Parser)]
#[command(name = "credlet", version, about, propagate_version = true)]
pub struct Cli {
    /// Log line format.
    #[arg(long, env = "CREDLET_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Log filter when RUST_LOG is unset (e.g. `info`, `credlet_csi=debug`).
    #[arg(long, env = "CREDLET_LOG_LEVEL", default_value = "info", global = true)]
    pub log_level: String,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Run modes.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The node agent (DaemonSet): CSI Identity + Node services.
    Agent(Box<AgentArgs>),
    /// The certificate authority (Deployment): issues agent and pod
    /// certificates over gRPC with mutual TLS.
    Ca(Box<CaArgs>),
    /// Everything in one process, no cluster: an embedded CA, the agent, and
    /// a simulated kubelet publishing a volume into a local folder.
    Demo(DemoArgs),
}

/// `credlet agent` flags.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Unix socket the CSI services listen on (a `unix://` prefix is
    /// accepted). Without it the agent serves no CSI volumes.
    #[arg(long, env = "CREDLET_CSI_ENDPOINT")]
    pub csi_endpoint: Option<String>,
    /// This node's name, reported by NodeGetInfo.
    #[arg(long, env = "CREDLET_NODE_ID")]
    pub node_id: String,
    /// Directory for volume records (no keys, no tokens). A tmpfs such as
    /// /run fits: volumes do not survive a reboot either.
    #[arg(long, env = "CREDLET_STATE_DIR", default_value = "/run/credlet")]
    pub state_dir: PathBuf,
    /// The kubelet's root directory; every target path must be below it.
    #[arg(long, env = "CREDLET_KUBELET_ROOT", default_value = "/var/lib/kubelet")]
    pub kubelet_root: PathBuf,
    /// CSI driver name (domain style, at most 63 characters).
    #[arg(long, env = "CREDLET_DRIVER_NAME", default_value = credlet_csi::server::DEFAULT_DRIVER_NAME)]
    pub driver_name: String,
    /// Serve `/healthz`, `/readyz` and `/metrics` (Prometheus) on this
    /// address, e.g. `0.0.0.0:9808`. Off when unset.
    #[arg(long, env = "CREDLET_HEALTH_LISTEN")]
    pub health_listen: Option<std::net::SocketAddr>,
    /// The kubelet's plugin registry directory (usually
    /// `<kubelet root>/plugins_registry`). When set, the agent registers its
    /// CSI driver with the kubelet itself (socket
    /// `<dir>/<driver name>-reg.sock`): no registrar sidecar is needed.
    #[arg(long, env = "CREDLET_REGISTRATION_DIR")]
    pub registration_dir: Option<PathBuf>,
    /// The CSI socket's path as the kubelet sees it, reported at
    /// registration (default: the --csi-endpoint path, right when the agent
    /// mounts the host directory at the same path).
    #[arg(long, env = "CREDLET_KUBELET_REGISTRATION_PATH")]
    pub kubelet_registration_path: Option<PathBuf>,
    /// SPIFFE trust domain of issued identities.
    #[arg(long, env = "CREDLET_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Audience of the service account token the CSIDriver requests for the
    /// CA.
    #[arg(long, env = "CREDLET_TOKEN_AUDIENCE", default_value = "credlet-ca")]
    pub token_audience: String,
    /// Sign with an embedded development CA that trusts the pod identity in
    /// the volume context WITHOUT checking a token. Local testing only.
    #[arg(long, env = "CREDLET_DEV_CA")]
    pub dev_ca: bool,
    /// The CA service (`credlet ca`) to ask for pod certificates:
    /// `https://host:port`. Mutually exclusive with --dev-ca.
    #[arg(long, env = "CREDLET_CA_URL")]
    pub ca_url: Option<String>,
    /// PEM bundle of the roots that sign the CA service's serving
    /// certificate. Required with --ca-url.
    #[arg(long, env = "CREDLET_CA_TRUST")]
    pub ca_trust: Option<PathBuf>,
    /// The agent's projected service account token for the CA's audience;
    /// read again on every use (the kubelet rotates it).
    #[arg(
        long,
        env = "CREDLET_CA_TOKEN_FILE",
        default_value = credlet_csi::remote::DEFAULT_TOKEN_FILE
    )]
    pub ca_token_file: PathBuf,
    /// Deadline of every call to the CA, in milliseconds.
    #[arg(long, env = "CREDLET_CA_TIMEOUT_MS", default_value_t = 5000)]
    pub ca_timeout_ms: u64,
    /// Write volumes into plain directories instead of tmpfs mounts, so the
    /// agent runs without root. Development only: keys then live on the
    /// directory's filesystem.
    #[arg(long, env = "CREDLET_PLAIN_DIRECTORIES")]
    pub plain_directories: bool,
    /// Size limit of each volume's tmpfs, in KiB.
    #[arg(long, env = "CREDLET_TMPFS_SIZE_KIB", default_value_t = 1024)]
    pub tmpfs_size_kib: u64,
    /// First retry delay after a failed renewal, in milliseconds.
    #[arg(long, env = "CREDLET_BACKOFF_BASE_MS", default_value_t = 1000)]
    pub backoff_base_ms: u64,
    /// Longest retry delay after failed renewals, in milliseconds.
    #[arg(long, env = "CREDLET_BACKOFF_CAP_MS", default_value_t = 300_000)]
    pub backoff_cap_ms: u64,
    /// Most renewals in flight at once.
    #[arg(long, env = "CREDLET_MAX_CONCURRENT_RENEWALS", default_value_t = 32)]
    pub max_concurrent_renewals: usize,
    /// Shortest certificate lifetime the development CA issues, in seconds.
    #[arg(long, env = "CREDLET_DEV_CA_MIN_DURATION_S", default_value_t = 1)]
    pub dev_ca_min_duration_s: u64,
    /// Image guard: the CRI socket credlet serves to the kubelet
    /// (`containerRuntimeEndpoint` / `imageServiceEndpoint`). Without it the
    /// image guard is off.
    #[arg(long, env = "CREDLET_CRI_LISTEN")]
    pub cri_listen: Option<String>,
    /// Image guard: the real runtime's CRI socket.
    #[arg(
        long,
        env = "CREDLET_CRI_UPSTREAM",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub cri_upstream: String,
    /// Image guard: node-wide verification policy (NeverVerify,
    /// NeverVerifyPreloadedImages, NeverVerifyAllowlistedImages,
    /// AlwaysVerify).
    #[arg(
        long,
        env = "CREDLET_IMAGE_POLICY",
        default_value = "NeverVerifyPreloadedImages"
    )]
    pub image_policy: String,
    /// Image guard: per-namespace policy overrides, `namespace=Policy`.
    #[arg(long, env = "CREDLET_IMAGE_POLICY_NAMESPACES", value_delimiter = ',')]
    pub image_policy_namespace: Vec<String>,
    /// Image guard: repositories never verified under
    /// NeverVerifyAllowlistedImages (`registry/repo`, or `registry/path/*`).
    #[arg(long, env = "CREDLET_IMAGE_ALLOWLIST", value_delimiter = ',')]
    pub image_allowlist: Vec<String>,
    /// Image guard: `enforce`, or `audit` (decide, log, count and emit
    /// Events, never block).
    #[arg(long, env = "CREDLET_IMAGE_GUARD_MODE", default_value = "enforce")]
    pub image_guard_mode: String,
    /// Image guard: how long a positive verification holds (`24h`, `90m`).
    #[arg(long, env = "CREDLET_IMAGE_VERIFICATION_TTL", default_value = "24h")]
    pub image_verification_ttl: String,
    /// Image guard: extra root CA files (PEM) to trust for registries.
    #[arg(long, env = "CREDLET_REGISTRY_CA", value_delimiter = ',')]
    pub registry_ca: Vec<PathBuf>,
    /// Kubeconfig for the pod watch and Events (default: in-cluster, or
    /// $KUBECONFIG).
    #[arg(long, env = "CREDLET_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Image guard: directory of image records (which credentials proved
    /// access to which cached image; no credentials themselves). It must
    /// persist as long as the runtime's images do: on a tmpfs, a reboot
    /// would make every cached private image look preloaded.
    #[arg(
        long,
        env = "CREDLET_IMAGE_RECORDS_DIR",
        default_value = "/var/lib/credlet"
    )]
    pub image_records_dir: PathBuf,
}

/// Validated image guard configuration.
#[derive(Debug, Clone)]
pub struct ImageGuardConfig {
    /// Socket served to the kubelet.
    pub listen: PathBuf,
    /// The runtime's socket.
    pub upstream: PathBuf,
    /// The policy.
    pub policy: credlet_imageguard::policy::GuardPolicy,
    /// Extra registry root CAs, PEM.
    pub registry_roots: Vec<String>,
    /// Kubeconfig path, if not in-cluster / $KUBECONFIG.
    pub kubeconfig: Option<PathBuf>,
    /// Directory of image records (persistent).
    pub records_dir: PathBuf,
}

/// `credlet demo` flags.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Folder to publish the demo volume into (default: a fresh temporary
    /// folder, removed at the end).
    #[arg(long, env = "CREDLET_DEMO_DIR")]
    pub dir: Option<PathBuf>,
    /// Certificate lifetime in the demo, in seconds.
    #[arg(long, default_value_t = 4)]
    pub lifetime_s: u64,
    /// Rotations to wait for before unpublishing.
    #[arg(long, default_value_t = 2)]
    pub rotations: u32,
}

/// Validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// CSI socket path (`None`: CSI off).
    pub csi_socket: Option<PathBuf>,
    /// Health and metrics address (`None`: off).
    pub health_listen: Option<std::net::SocketAddr>,
    /// Kubelet plugin registration (`None`: off).
    pub registration: Option<credlet_csi::registration::RegistrationConfig>,
    /// The image guard (`None`: off).
    pub image_guard: Option<ImageGuardConfig>,
    /// Node name.
    pub node_id: String,
    /// State directory.
    pub state_dir: PathBuf,
    /// Canonical kubelet root.
    pub kubelet_root: PathBuf,
    /// CSI driver name.
    pub driver_name: String,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Token audience.
    pub token_audience: String,
    /// Use plain directories instead of tmpfs.
    pub plain_directories: bool,
    /// Per-volume tmpfs size.
    pub tmpfs_size_bytes: u64,
    /// Renewal backoff start.
    pub backoff_base: Duration,
    /// Renewal backoff cap.
    pub backoff_cap: Duration,
    /// Renewal concurrency.
    pub max_concurrent_renewals: usize,
    /// Shortest lifetime the dev CA issues.
    pub dev_ca_min_duration: Duration,
    /// The remote CA (`None`: the development CA, `--dev-ca`).
    pub remote_ca: Option<RemoteCaConfig>,
}

/// Validated `--ca-*` settings.
#[derive(Debug, Clone)]
pub struct RemoteCaConfig {
    /// `https://host:port`.
    pub url: String,
    /// PEM roots for the CA's serving certificate.
    pub trust_pem: String,
    /// The agent's projected token file.
    pub token_file: PathBuf,
    /// Deadline of every call.
    pub timeout: Duration,
}

/// A configuration problem, reported before start-up.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

fn err(message: impl Into<String>) -> ConfigError {
    ConfigError(message.into())
}

impl AgentArgs {
    /// Checks every flag and resolves paths.
    pub fn validate(&self) -> Result<AgentConfig, ConfigError> {
        let csi_socket = self
            .csi_endpoint
            .as_deref()
            .map(|s| socket_path("--csi-endpoint", s))
            .transpose()?;
        let image_guard = self
            .cri_listen
            .as_deref()
            .map(|listen| self.image_guard(listen))
            .transpose()?;
        if csi_socket.is_none() && image_guard.is_none() {
            return Err(err(
                "nothing to serve: pass --csi-endpoint (pod certificates) and/or --cri-listen (image guard)",
            ));
        }
        if self.node_id.trim().is_empty() || self.node_id.len() > 253 {
            return Err(err("--node-id must be 1-253 characters"));
        }
        credlet_csi::server::validate_driver_name(&self.driver_name)
            .map_err(|e| err(format!("--driver-name: {e}")))?;
        if !is_trust_domain(&self.trust_domain) {
            return Err(err(format!(
                "--trust-domain {:?} must be lowercase letters, digits, '.', '-' and '_'",
                self.trust_domain
            )));
        }
        if self.token_audience.trim().is_empty() {
            return Err(err("--token-audience must not be empty"));
        }
        if self.dev_ca && self.ca_url.is_some() {
            return Err(err(
                "--dev-ca and --ca-url exclude each other: pick the development CA or the CA service",
            ));
        }
        if csi_socket.is_some() && !self.dev_ca && self.ca_url.is_none() {
            return Err(err(
                "no CA configured: pass --ca-url https://host:port (with --ca-trust), or --dev-ca for local testing",
            ));
        }
        let remote_ca = self.remote_ca()?;
        let registration = self.registration(csi_socket.as_deref())?;
        // Only volumes live under the kubelet root; the image guard alone
        // does not need it to exist.
        let kubelet_root = if csi_socket.is_some() {
            canonical_dir("--kubelet-root", &self.kubelet_root)?
        } else {
            self.kubelet_root.clone()
        };
        if !self.state_dir.is_absolute() {
            return Err(err("--state-dir must be an absolute path"));
        }
        if self.tmpfs_size_kib < 64 || self.tmpfs_size_kib > 64 * 1024 {
            return Err(err("--tmpfs-size-kib must be between 64 and 65536"));
        }
        if self.backoff_base_ms == 0 || self.backoff_base_ms > self.backoff_cap_ms {
            return Err(err(
                "--backoff-base-ms must be positive and not above --backoff-cap-ms",
            ));
        }
        if self.max_concurrent_renewals == 0 || self.max_concurrent_renewals > 4096 {
            return Err(err("--max-concurrent-renewals must be between 1 and 4096"));
        }
        if self.dev_ca_min_duration_s == 0 {
            return Err(err("--dev-ca-min-duration-s must be at least 1"));
        }
        if csi_socket.is_some() && !self.plain_directories && !rustix::process::geteuid().is_root()
        {
            return Err(err(
                "mounting tmpfs volumes needs root (CAP_SYS_ADMIN); run as root or pass --plain-directories for development",
            ));
        }
        Ok(AgentConfig {
            csi_socket,
            health_listen: self.health_listen,
            registration,
            image_guard,
            node_id: self.node_id.clone(),
            state_dir: self.state_dir.clone(),
            kubelet_root,
            driver_name: self.driver_name.clone(),
            trust_domain: self.trust_domain.clone(),
            token_audience: self.token_audience.clone(),
            plain_directories: self.plain_directories,
            tmpfs_size_bytes: self.tmpfs_size_kib * 1024,
            backoff_base: Duration::from_millis(self.backoff_base_ms),
            backoff_cap: Duration::from_millis(self.backoff_cap_ms),
            max_concurrent_renewals: self.max_concurrent_renewals,
            dev_ca_min_duration: Duration::from_secs(self.dev_ca_min_duration_s),
            remote_ca,
        })
    }
}

impl AgentArgs {
    fn registration(
        &self,
        csi_socket: Option<&Path>,
    ) -> Result<Option<credlet_csi::registration::RegistrationConfig>, ConfigError> {
        let Some(dir) = &self.registration_dir else {
            if self.kubelet_registration_path.is_some() {
                return Err(err("--kubelet-registration-path needs --registration-dir"));
            }
            return Ok(None);
        };
        let Some(csi_socket) = csi_socket else {
            return Err(err(
                "--registration-dir registers the CSI driver: it needs --csi-endpoint",
            ));
        };
        if !dir.is_absolute() {
            return Err(err("--registration-dir must be an absolute path"));
        }
        if !dir.is_dir() {
            return Err(err(format!(
                "--registration-dir {}: not a directory (the kubelet creates <kubelet root>/plugins_registry)",
                dir.display()
            )));
        }
        let endpoint = match &self.kubelet_registration_path {
            Some(path) if !path.is_absolute() => {
                return Err(err("--kubelet-registration-path must be an absolute path"));
            }
            Some(path) => path.clone(),
            None => csi_socket.to_path_buf(),
        };
        Ok(Some(credlet_csi::registration::RegistrationConfig::new(
            dir.clone(),
            self.driver_name.clone(),
            endpoint,
        )))
    }

    fn remote_ca(&self) -> Result<Option<RemoteCaConfig>, ConfigError> {
        let Some(url) = &self.ca_url else {
            return Ok(None);
        };
        let uri: tonic::transport::Uri = url
            .parse()
            .map_err(|e| err(format!("--ca-url {url:?}: {e}")))?;
        if uri.scheme_str() != Some("https") || uri.host().is_none_or(str::is_empty) {
            return Err(err(format!("--ca-url {url:?} must be https://host:port")));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(err(format!("--ca-url {url:?} must not have a path")));
        }
        let trust = self
            .ca_trust
            .as_ref()
            .ok_or_else(|| err("--ca-url needs --ca-trust (the CA service's root PEM bundle)"))?;
        let trust_pem = std::fs::read_to_string(trust)
            .map_err(|e| err(format!("--ca-trust {}: {e}", trust.display())))?;
        if !trust_pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(err(format!(
                "--ca-trust {} holds no PEM certificate",
                trust.display()
            )));
        }
        if !self.ca_token_file.is_absolute() {
            return Err(err("--ca-token-file must be an absolute path"));
        }
        if !(100..=120_000).contains(&self.ca_timeout_ms) {
            return Err(err("--ca-timeout-ms must be between 100 and 120000"));
        }
        Ok(Some(RemoteCaConfig {
            url: url.clone(),
            trust_pem,
            token_file: self.ca_token_file.clone(),
            timeout: Duration::from_millis(self.ca_timeout_ms),
        }))
    }

    fn image_guard(&self, listen: &str) -> Result<ImageGuardConfig, ConfigError> {
        use credlet_imageguard::policy::{GuardPolicy, Mode, VerifyPolicy};
        use credlet_imageguard::reference::Allowlist;
        let listen = socket_path("--cri-listen", listen)?;
        let upstream = socket_path("--cri-upstream", &self.cri_upstream)?;
        if listen == upstream {
            return Err(err("--cri-listen and --cri-upstream must differ"));
        }
        let default: VerifyPolicy = self
            .image_policy
            .parse()
            .map_err(|e| err(format!("--image-policy: {e}")))?;
        let mut namespaces = std::collections::HashMap::new();
        for entry in &self.image_policy_namespace {
            let (ns, policy) = entry.split_once('=').ok_or_else(|| {
                err(format!(
                    "--image-policy-namespace {entry:?} must be namespace=Policy"
                ))
            })?;
            let policy: VerifyPolicy = policy
                .parse()
                .map_err(|e| err(format!("--image-policy-namespace {entry:?}: {e}")))?;
            namespaces.insert(ns.trim().to_owned(), policy);
        }
        let allowlist = Allowlist::parse(&self.image_allowlist)
            .map_err(|e| err(format!("--image-allowlist: {e}")))?;
        let mode = match self.image_guard_mode.as_str() {
            "enforce" => Mode::Enforce,
            "audit" => Mode::Audit,
            other => {
                return Err(err(format!(
                    "--image-guard-mode {other:?} must be enforce or audit"
                )));
            }
        };
        let ttl = credlet_csi::attributes::parse_duration(&self.image_verification_ttl)
            .map_err(|e| err(format!("--image-verification-ttl: {e}")))?;
        if !self.image_records_dir.is_absolute() {
            return Err(err("--image-records-dir must be an absolute path"));
        }
        let mut registry_roots = Vec::new();
        for path in &self.registry_ca {
            let pem = std::fs::read_to_string(path)
                .map_err(|e| err(format!("--registry-ca {}: {e}", path.display())))?;
            registry_roots.push(pem);
        }
        Ok(ImageGuardConfig {
            listen,
            upstream,
            policy: GuardPolicy {
                default,
                namespaces,
                allowlist,
                mode,
                ttl,
            },
            registry_roots,
            records_dir: self.image_records_dir.clone(),
            kubeconfig: self.kubeconfig.clone(),
        })
    }
}

fn socket_path(flag: &str, raw: &str) -> Result<PathBuf, ConfigError> {
    let path = PathBuf::from(raw.strip_prefix("unix://").unwrap_or(raw));
    if !path.is_absolute() {
        return Err(err(format!(
            "{flag} {raw:?} must be an absolute socket path"
        )));
    }
    Ok(path)
}

fn canonical_dir(flag: &str, path: &Path) -> Result<PathBuf, ConfigError> {
    let canonical = path
        .canonicalize()
        .map_err(|e| err(format!("{flag} {}: {e}", path.display())))?;
    if !canonical.is_dir() {
        return Err(err(format!("{flag} {} is not a directory", path.display())));
    }
    Ok(canonical)
}

fn is_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

/// `credlet ca` flags.
#[derive(Debug, Args)]
pub struct CaArgs {
    /// Address to serve gRPC over TLS on, `ip:port`.
    #[arg(long, env = "CREDLET_CA_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: String,
    /// The CA's signing certificate (PEM): a self-signed root or an
    /// intermediate. Reloaded when it changes.
    #[arg(long, env = "CREDLET_CA_CERT")]
    pub ca_cert: PathBuf,
    /// The signing certificate's private key (PKCS#8 PEM).
    #[arg(long, env = "CREDLET_CA_KEY")]
    pub ca_key: PathBuf,
    /// Certificates above the signing certificate, up to and including the
    /// root (PEM), when the signing certificate is an intermediate.
    #[arg(long, env = "CREDLET_CA_CHAIN")]
    pub ca_chain: Option<PathBuf>,
    /// SPIFFE trust domain of issued identities.
    #[arg(long, env = "CREDLET_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Audience service account tokens must carry.
    #[arg(long, env = "CREDLET_TOKEN_AUDIENCE", default_value = "credlet-ca")]
    pub token_audience: String,
    /// How service account tokens are verified: `token-review` (a
    /// TokenReview per new token) or `jwks` (offline, against the cluster's
    /// service account issuer keys from `GET /openid/v1/jwks`, refreshed in
    /// the background; no API round trip per new token).
    #[arg(
        long,
        env = "CREDLET_TOKEN_VERIFICATION",
        default_value = "token-review"
    )]
    pub token_verification: String,
    /// With `--token-verification jwks`: an issuer (`iss`) tokens may name
    /// (repeatable: every `--service-account-issuer` of the API server
    /// while it migrates issuers). Default: the `issuer` of the API
    /// server's `/.well-known/openid-configuration`.
    #[arg(long, env = "CREDLET_TOKEN_ISSUERS", value_delimiter = ',')]
    pub token_issuer: Vec<String>,
    /// With `--token-verification jwks`: how often the issuer keys are
    /// fetched again (`5m`); a token signed with an unknown key id fetches
    /// them at once, at most every 10 s.
    #[arg(long, env = "CREDLET_JWKS_REFRESH", default_value = "5m")]
    pub jwks_refresh: String,
    /// The agent's service account, `namespace/name`; only its tokens get
    /// agent client certificates.
    #[arg(
        long,
        env = "CREDLET_AGENT_SERVICE_ACCOUNT",
        default_value = "credlet/credlet-agent"
    )]
    pub agent_service_account: String,
    /// Longest certificate lifetime; longer requests are shortened
    /// (`2160h`, `24h`).
    #[arg(long, env = "CREDLET_MAX_DURATION", default_value = "2160h")]
    pub max_duration: String,
    /// Lifetime when a request asks for none, and of agent certificates.
    #[arg(long, env = "CREDLET_DEFAULT_DURATION", default_value = "24h")]
    pub default_duration: String,
    /// Shortest certificate lifetime; shorter requests are lengthened
    /// (`30s`, `1h`). Default: 1 h, or --max-duration if that is shorter.
    /// Lifetimes of minutes or less are a test and benchmark setting: they
    /// make every pod renew that often.
    #[arg(long, env = "CREDLET_MIN_DURATION")]
    pub min_duration: Option<String>,
    /// Renewal points are drawn from ± this share of the lifetime around
    /// the nominal point (percent, 0-40; 10: renewal at 50-70 % of the
    /// lifetime), so that certificates issued together do not renew
    /// together. 0 turns spreading off.
    #[arg(long, env = "CREDLET_RENEWAL_SPREAD_PERCENT", default_value_t = 10)]
    pub renewal_spread_percent: u32,
    /// Allowed DNS SAN template (repeatable): an exact template such as
    /// `$POD_NAME.$POD_NAMESPACE.svc`, or `*.` + suffix template
    /// (one label in front); `namespace=template` applies to one namespace
    /// and replaces the node-wide list there.
    #[arg(long, env = "CREDLET_DNS_TEMPLATES", value_delimiter = ',')]
    pub dns_template: Vec<String>,
    /// Range IP SANs may come from (repeatable CIDR); none by default.
    #[arg(long, env = "CREDLET_ALLOWED_IP_CIDRS", value_delimiter = ',')]
    pub allowed_ip_cidr: Vec<String>,
    /// DNS name or IP address of the serving certificate (repeatable), e.g.
    /// the Service name `credlet-ca.credlet.svc`.
    #[arg(
        long,
        env = "CREDLET_SERVER_NAMES",
        value_delimiter = ',',
        required = true
    )]
    pub server_name: Vec<String>,
    /// Kubeconfig for TokenReviews and pod lookups (default: in-cluster, or
    /// $KUBECONFIG).
    #[arg(long, env = "CREDLET_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Longest wait for in-flight requests on SIGTERM, in seconds.
    #[arg(long, env = "CREDLET_DRAIN_TIMEOUT_S", default_value_t = 30)]
    pub drain_timeout_s: u64,
    /// Signer name of PodCertificateRequests to answer (repeatable), e.g.
    /// `credlet.io/pods`. None: the PodCertificateRequest signer is off.
    #[arg(long, env = "CREDLET_SIGNER_NAMES", value_delimiter = ',')]
    pub signer_name: Vec<String>,
    /// PodCertificateRequest API version: `auto` (v1 when the server
    /// serves it, else v1beta1), `v1beta1` or `v1`.
    #[arg(long, env = "CREDLET_SIGNER_API_VERSION", default_value = "auto")]
    pub signer_api_version: String,
    /// PodCertificateRequests handled at once.
    #[arg(long, env = "CREDLET_SIGNER_WORKERS", default_value_t = 8)]
    pub signer_workers: usize,
    /// Last segment of the published ClusterTrustBundle names
    /// (`<signer name, '/' as ':'>:<suffix>`); empty: no trust bundle is
    /// published.
    #[arg(long, env = "CREDLET_TRUST_BUNDLE_SUFFIX", default_value = "credlet")]
    pub trust_bundle_suffix: String,
    /// Namespace of the signer's leader election Lease.
    #[arg(
        long,
        env = "CREDLET_LEADER_ELECTION_NAMESPACE",
        default_value = "credlet"
    )]
    pub leader_election_namespace: String,
    /// Name of the signer's leader election Lease.
    #[arg(
        long,
        env = "CREDLET_LEADER_ELECTION_LEASE_NAME",
        default_value = "credlet-signer"
    )]
    pub leader_election_lease_name: String,
    /// This replica's leader election identity. Default: $POD_NAME, else
    /// the host name.
    #[arg(long, env = "CREDLET_LEADER_ELECTION_IDENTITY")]
    pub leader_election_identity: Option<String>,
    /// How long an unrenewed Lease stays held.
    #[arg(
        long,
        env = "CREDLET_LEADER_ELECTION_LEASE_DURATION",
        default_value = "15s"
    )]
    pub leader_election_lease_duration: String,
    /// How long the leader keeps writing without a successful renewal
    /// (below the lease duration).
    #[arg(
        long,
        env = "CREDLET_LEADER_ELECTION_RENEW_DEADLINE",
        default_value = "10s"
    )]
    pub leader_election_renew_deadline: String,
    /// Interval of Lease acquisition attempts and renewals (below the renew
    /// deadline).
    #[arg(
        long,
        env = "CREDLET_LEADER_ELECTION_RETRY_PERIOD",
        default_value = "2s"
    )]
    pub leader_election_retry_period: String,
    /// Address of the `/metrics`, `/healthz` and `/readyz` HTTP server,
    /// `ip:port`; empty: not served. Loopback by default: the server has no
    /// authentication, so reaching it from the network (for the kubelet's
    /// probes and a scraper, `0.0.0.0:9090`) is an explicit choice.
    #[arg(long, env = "CREDLET_METRICS_LISTEN", default_value = "127.0.0.1:9090")]
    pub metrics_listen: String,
}

/// Validated `credlet ca` configuration.
#[derive(Debug, Clone)]
pub struct CaConfig {
    /// Listening address.
    pub listen: std::net::SocketAddr,
    /// Everything the CA service needs.
    pub settings: credlet_ca_service::Settings,
    /// Kubeconfig path, if not in-cluster / $KUBECONFIG.
    pub kubeconfig: Option<PathBuf>,
    /// Drain bound on shutdown.
    pub drain_timeout: Duration,
    /// The PodCertificateRequest signer, if `--signer-name` is given.
    pub signer: Option<credlet_signer::SignerRuntimeSettings>,
    /// Where to serve metrics and probes, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl CaArgs {
    /// Checks every flag; the error names the flag.
    pub fn validate(&self) -> Result<CaConfig, ConfigError> {
        use credlet_ca_service::policy::{IpRange, ServiceAccountRef};
        let listen: std::net::SocketAddr = self.listen.parse().map_err(|_| {
            err(format!(
                "--listen {:?} must be ip:port, e.g. 0.0.0.0:8443",
                self.listen
            ))
        })?;
        let file = |flag: &str, path: &Path| -> Result<PathBuf, ConfigError> {
            if !path.is_file() {
                return Err(err(format!(
                    "{flag} {}: not a readable file",
                    path.display()
                )));
            }
            Ok(path.to_path_buf())
        };
        let files = credlet_ca_service::KeyFiles {
            cert: file("--ca-cert", &self.ca_cert)?,
            key: file("--ca-key", &self.ca_key)?,
            chain: self
                .ca_chain
                .as_deref()
                .map(|p| file("--ca-chain", p))
                .transpose()?,
        };
        if !is_trust_domain(&self.trust_domain) {
            return Err(err(format!(
                "--trust-domain {:?} must be lowercase letters, digits, '.', '-' and '_'",
                self.trust_domain
            )));
        }
        if self.token_audience.trim().is_empty() {
            return Err(err("--token-audience must not be empty"));
        }
        let mut policy = credlet_ca_service::ServicePolicy::new(self.trust_domain.clone());
        policy.agent_service_account = ServiceAccountRef::parse(&self.agent_service_account)
            .map_err(|e| err(format!("--agent-service-account: {e}")))?;
        policy.max_duration = credlet_csi::attributes::parse_duration(&self.max_duration)
            .map_err(|e| err(format!("--max-duration: {e}")))?;
        policy.default_duration = credlet_csi::attributes::parse_duration(&self.default_duration)
            .map_err(|e| err(format!("--default-duration: {e}")))?;
        match &self.min_duration {
            Some(min) => {
                policy.min_duration = credlet_csi::attributes::parse_duration(min)
                    .map_err(|e| err(format!("--min-duration: {e}")))?;
                if policy.min_duration > policy.max_duration {
                    return Err(err(format!(
                        "--min-duration {min} must not be above --max-duration {}",
                        self.max_duration
                    )));
                }
            }
            None => policy.min_duration = policy.min_duration.min(policy.max_duration),
        }
        policy.agent_duration = policy.default_duration;
        if self.renewal_spread_percent > credlet_ca_service::policy::MAX_RENEWAL_SPREAD_PERCENT {
            return Err(err(format!(
                "--renewal-spread-percent {} must be 0-{}",
                self.renewal_spread_percent,
                credlet_ca_service::policy::MAX_RENEWAL_SPREAD_PERCENT
            )));
        }
        policy.renewal_spread_percent = self.renewal_spread_percent;
        for template in &self.dns_template {
            policy
                .add_dns_template(template)
                .map_err(|e| err(format!("--dns-template: {e}")))?;
        }
        for cidr in &self.allowed_ip_cidr {
            policy
                .ip_ranges
                .push(IpRange::parse(cidr).map_err(|e| err(format!("--allowed-ip-cidr: {e}")))?);
        }
        policy.validate().map_err(|e| err(e.to_string()))?;
        if self.server_name.iter().any(|n| n.trim().is_empty()) {
            return Err(err("--server-name must not be empty"));
        }
        let server_names = credlet_ca_service::ServerNames::parse(&self.server_name);
        let signer = self.signer_settings(&policy)?;
        let metrics_listen = match self.metrics_listen.trim() {
            "" => None,
            text => Some(text.parse().map_err(|_| {
                err(format!(
                    "--metrics-listen {text:?} must be ip:port (e.g. 0.0.0.0:9090) or empty"
                ))
            })?),
        };
        let jwks = self.jwks_settings()?;
        let mut settings = credlet_ca_service::Settings::new(
            files,
            policy,
            self.token_audience.clone(),
            server_names,
        );
        settings.jwks = jwks;
        Ok(CaConfig {
            listen,
            settings,
            kubeconfig: self.kubeconfig.clone(),
            drain_timeout: Duration::from_secs(self.drain_timeout_s),
            signer,
            metrics_listen,
        })
    }

    /// Offline token verification settings; `None` with
    /// `--token-verification token-review`.
    fn jwks_settings(&self) -> Result<Option<credlet_ca_service::JwksSettings>, ConfigError> {
        let refresh = credlet_csi::attributes::parse_duration(&self.jwks_refresh)
            .map_err(|e| err(format!("--jwks-refresh: {e}")))?;
        match self.token_verification.trim() {
            "token-review" => {
                if !self.token_issuer.is_empty() {
                    return Err(err(
                        "--token-issuer only applies with --token-verification jwks",
                    ));
                }
                Ok(None)
            }
            "jwks" => {
                let mut settings =
                    credlet_ca_service::JwksSettings::new(self.token_audience.clone());
                for issuer in &self.token_issuer {
                    let issuer = issuer.trim();
                    if issuer.is_empty() || issuer.chars().any(char::is_whitespace) {
                        return Err(err(format!(
                            "--token-issuer {issuer:?} must be a service account issuer URL, e.g. https://kubernetes.default.svc.cluster.local"
                        )));
                    }
                    settings.issuers.push(issuer.to_owned());
                }
                if refresh < std::time::Duration::from_secs(10) {
                    return Err(err(format!(
                        "--jwks-refresh {} must be at least 10s",
                        self.jwks_refresh
                    )));
                }
                settings.refresh_interval = refresh;
                Ok(Some(settings))
            }
            other => Err(err(format!(
                "--token-verification {other:?} must be token-review or jwks"
            ))),
        }
    }

    /// The signer's settings; `None` without `--signer-name`.
    fn signer_settings(
        &self,
        policy: &credlet_ca_service::ServicePolicy,
    ) -> Result<Option<credlet_signer::SignerRuntimeSettings>, ConfigError> {
        use credlet_signer::{LeaseSettings, PublisherSettings, SignerSettings};
        let names: Vec<String> = self
            .signer_name
            .iter()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect();
        if names.is_empty() {
            return Ok(None);
        }
        for name in &names {
            if !credlet_signer::controller::is_signer_name(name) {
                return Err(err(format!(
                    "--signer-name {name:?} must be <domain>/<path>, e.g. credlet.io/pods"
                )));
            }
        }
        if policy.max_duration < credlet_signer::controller::MIN_LIFETIME {
            return Err(err(format!(
                "--max-duration {} is below the 1h the PodCertificateRequest API requires; raise it or drop --signer-name",
                self.max_duration
            )));
        }
        let identity = match &self.leader_election_identity {
            Some(identity) => identity.trim().to_owned(),
            None => default_identity(),
        };
        if identity.is_empty() {
            return Err(err(
                "--leader-election-identity is empty and neither $POD_NAME nor the host name is set",
            ));
        }
        let mut signer = SignerSettings::new(names.clone(), identity.clone());
        signer.api_version = self
            .signer_api_version
            .parse()
            .map_err(|e| err(format!("--signer-api-version: {e}")))?;
        signer.workers = self.signer_workers;
        signer.validate().map_err(|e| {
            err(format!(
                "--signer-name / --signer-workers / --leader-election-identity: {e}"
            ))
        })?;
        let duration = |flag: &str, value: &str| {
            credlet_csi::attributes::parse_duration(value).map_err(|e| err(format!("{flag}: {e}")))
        };
        let mut lease = LeaseSettings::new(
            self.leader_election_namespace.trim(),
            self.leader_election_lease_name.trim(),
            identity,
        );
        lease.lease_duration = duration(
            "--leader-election-lease-duration",
            &self.leader_election_lease_duration,
        )?;
        lease.renew_deadline = duration(
            "--leader-election-renew-deadline",
            &self.leader_election_renew_deadline,
        )?;
        lease.retry_period = duration(
            "--leader-election-retry-period",
            &self.leader_election_retry_period,
        )?;
        lease
            .validate()
            .map_err(|e| err(format!("--leader-election-*: {e}")))?;
        let suffix = self.trust_bundle_suffix.trim();
        let publisher = if suffix.is_empty() {
            None
        } else {
            if !is_bundle_suffix(suffix) {
                return Err(err(format!(
                    "--trust-bundle-suffix {suffix:?} must be lowercase letters, digits, '-' and '.'"
                )));
            }
            let mut publisher = PublisherSettings::new(names);
            publisher.name_suffix = suffix.to_owned();
            publisher
                .validate()
                .map_err(|e| err(format!("--trust-bundle-suffix: {e}")))?;
            Some(publisher)
        };
        Ok(Some(credlet_signer::SignerRuntimeSettings {
            signer,
            lease: Some(lease),
            publisher,
        }))
    }
}

/// `$POD_NAME`, else the host name.
fn default_identity() -> String {
    if let Ok(name) = std::env::var("POD_NAME")
        && !name.trim().is_empty()
    {
        return name.trim().to_owned();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// A DNS subdomain (what the API requires after the signer prefix).
fn is_bundle_suffix(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod remote_ca_tests {
    use super::*;

    fn agent_args(extra: &[&str]) -> Result<AgentConfig, ConfigError> {
        let root = tempfile::tempdir().expect("tmp");
        let root_path = root.path().to_string_lossy().into_owned();
        let mut args = vec![
            "credlet",
            "agent",
            "--csi-endpoint",
            "/run/credlet-test/csi.sock",
            "--node-id",
            "node-a",
            "--kubelet-root",
            &root_path,
            "--plain-directories",
        ];
        args.extend_from_slice(extra);
        let cli = Cli::try_parse_from(args).expect("parses");
        let Command::Agent(agent) = cli.command else {
            panic!("not the agent command");
        };
        agent.validate()
    }

    fn trust_file() -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(
            file.path(),
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        file
    }

    fn ca_args(extra: &[&str]) -> Result<CaConfig, ConfigError> {
        let cert = tempfile::NamedTempFile::new().expect("tmp");
        let key = tempfile::NamedTempFile::new().expect("tmp");
        let cert_path = cert.path().to_string_lossy().into_owned();
        let key_path = key.path().to_string_lossy().into_owned();
        let mut args = vec![
            "credlet",
            "ca",
            "--ca-cert",
            &cert_path,
            "--ca-key",
            &key_path,
            "--server-name",
            "credlet-ca.credlet.svc",
        ];
        args.extend_from_slice(extra);
        let cli = Cli::try_parse_from(args).expect("parses");
        let Command::Ca(ca) = cli.command else {
            panic!("not the ca command");
        };
        ca.validate()
    }

    /// The names the CA serves under reach the policy every issuance path
    /// (the gRPC API and the signer) shares, so no pod gets them.
    #[test]
    fn the_cas_server_names_are_reserved_in_its_policy() {
        let config = ca_args(&["--server-name", "10.96.0.10"]).expect("valid");
        let names = &config.settings.policy.ca_names;
        assert_eq!(names.dns_names, ["credlet-ca.credlet.svc"]);
        assert_eq!(
            names.ip_addresses,
            ["10.96.0.10".parse::<std::net::IpAddr>().unwrap()]
        );
    }

    #[test]
    fn ca_lifetime_bounds() {
        let policy = |extra: &[&str]| ca_args(extra).expect("valid").settings.policy;
        // Default: 1 h, or the maximum when that is shorter.
        assert_eq!(policy(&[]).min_duration, Duration::from_secs(3600));
        assert_eq!(
            policy(&["--max-duration", "20m"]).min_duration,
            Duration::from_secs(1200)
        );
        // A short minimum (tests, benchmarks) lets short requests through.
        let short = policy(&["--min-duration", "30s"]);
        assert_eq!(short.min_duration, Duration::from_secs(30));
        assert_eq!(short.duration(45), Duration::from_secs(45));
        assert_eq!(short.duration(5), Duration::from_secs(30));
        assert_eq!(short.ca_policy().min_duration, Duration::from_secs(30));
        for (flags, mention) in [
            (&["--min-duration", "0s"][..], "--min-duration"),
            (&["--min-duration", "soon"], "--min-duration"),
            (
                &["--min-duration", "2h", "--max-duration", "1h"],
                "must not be above --max-duration",
            ),
        ] {
            let error = ca_args(flags).expect_err("invalid");
            assert!(error.0.contains(mention), "{flags:?}: {error}");
        }
    }

    #[test]
    fn token_verification_flags() {
        assert_eq!(ca_args(&[]).expect("valid").settings.jwks, None);
        let jwks = ca_args(&["--token-verification", "jwks"])
            .expect("valid")
            .settings
            .jwks
            .expect("jwks on");
        assert!(jwks.issuers.is_empty(), "discovered from the API server");
        assert_eq!(jwks.audience, "credlet-ca");
        assert_eq!(jwks.refresh_interval, Duration::from_secs(300));
        let jwks = ca_args(&[
            "--token-verification",
            "jwks",
            "--token-issuer",
            "https://oidc.example.com/cluster-a",
            "--token-issuer",
            "https://kubernetes.default.svc.cluster.local",
            "--jwks-refresh",
            "1m",
            "--token-audience",
            "mesh-ca",
        ])
        .expect("valid")
        .settings
        .jwks
        .expect("jwks on");
        assert_eq!(
            jwks.issuers,
            [
                "https://oidc.example.com/cluster-a",
                "https://kubernetes.default.svc.cluster.local"
            ]
        );
        assert_eq!(jwks.refresh_interval, Duration::from_secs(60));
        assert_eq!(jwks.audience, "mesh-ca");
        for (flags, mention) in [
            (
                &["--token-verification", "oidc"][..],
                "token-review or jwks",
            ),
            (&["--token-issuer", "https://x"], "only applies with"),
            (
                &["--token-verification", "jwks", "--token-issuer", "a b"],
                "--token-issuer",
            ),
            (
                &["--token-verification", "jwks", "--jwks-refresh", "1s"],
                "at least 10s",
            ),
            (&["--jwks-refresh", "often"], "--jwks-refresh"),
        ] {
            let error = ca_args(flags).expect_err("invalid");
            assert!(error.0.contains(mention), "{flags:?}: {error}");
        }
    }

    #[test]
    fn renewal_spread_flag() {
        let spread = |extra: &[&str]| {
            ca_args(extra)
                .expect("valid")
                .settings
                .policy
                .renewal_spread_percent
        };
        assert_eq!(spread(&[]), 10);
        assert_eq!(spread(&["--renewal-spread-percent", "0"]), 0);
        assert_eq!(spread(&["--renewal-spread-percent", "40"]), 40);
        let error = ca_args(&["--renewal-spread-percent", "41"]).expect_err("invalid");
        assert!(error.0.contains("must be 0-40"), "{error}");
    }

    #[test]
    fn signer_flags() {
        let config = ca_args(&[]).expect("valid");
        assert!(config.signer.is_none(), "no --signer-name: signer off");
        assert_eq!(
            config.metrics_listen,
            Some("127.0.0.1:9090".parse().unwrap()),
            "unauthenticated metrics stay on loopback unless asked for"
        );
        assert_eq!(
            ca_args(&["--metrics-listen", ""])
                .expect("valid")
                .metrics_listen,
            None
        );
        let config = ca_args(&[
            "--signer-name",
            "credlet.io/pods",
            "--signer-name",
            "example.com/other",
            "--leader-election-identity",
            "ca-0",
            "--signer-api-version",
            "v1beta1",
        ])
        .expect("valid");
        let signer = config.signer.expect("signer on");
        assert_eq!(
            signer.signer.signer_names,
            ["credlet.io/pods", "example.com/other"]
        );
        let lease = signer.lease.expect("lease");
        assert_eq!(lease.identity, "ca-0");
        assert_eq!(lease.namespace, "credlet");
        assert_eq!(lease.lease_duration, Duration::from_secs(15));
        assert_eq!(lease.renew_deadline, Duration::from_secs(10));
        assert_eq!(lease.retry_period, Duration::from_secs(2));
        assert_eq!(signer.publisher.expect("publisher").name_suffix, "credlet");
        let signer = |extra: &[&str]| {
            let mut flags = vec!["--signer-name", "credlet.io/pods"];
            if !extra.contains(&"--leader-election-identity") {
                flags.extend_from_slice(&["--leader-election-identity", "ca-0"]);
            }
            flags.extend_from_slice(extra);
            ca_args(&flags)
        };
        assert!(
            signer(&["--trust-bundle-suffix", ""])
                .expect("valid")
                .signer
                .expect("on")
                .publisher
                .is_none()
        );
        for (flags, mention) in [
            (&["--signer-name", "pods"][..], "--signer-name"),
            (&["--signer-api-version", "v2"], "--signer-api-version"),
            (&["--signer-workers", "0"], "--signer-workers"),
            (&["--max-duration", "30m"], "--max-duration"),
            (
                &["--leader-election-renew-deadline", "20s"],
                "renew deadline",
            ),
            (&["--leader-election-retry-period", "10s"], "retry period"),
            (
                &["--leader-election-lease-duration", "soon"],
                "--leader-election-lease-duration",
            ),
            (
                &["--leader-election-identity", " "],
                "--leader-election-identity",
            ),
            (&["--trust-bundle-suffix", "A:b"], "--trust-bundle-suffix"),
            (&["--metrics-listen", "localhost"], "--metrics-listen"),
        ] {
            let error = signer(flags).expect_err("invalid");
            assert!(error.0.contains(mention), "{flags:?}: {error}");
        }
    }

    #[test]
    fn a_ca_is_required_and_only_one() {
        let error = agent_args(&[]).expect_err("no CA");
        assert!(error.0.contains("--ca-url"), "{error}");
        let trust = trust_file();
        let trust_path = trust.path().to_string_lossy().into_owned();
        let error = agent_args(&[
            "--dev-ca",
            "--ca-url",
            "https://ca:8443",
            "--ca-trust",
            &trust_path,
        ])
        .expect_err("both");
        assert!(error.0.contains("--dev-ca and --ca-url"), "{error}");
    }

    #[test]
    fn remote_ca_flags_are_checked() {
        let trust = trust_file();
        let trust_path = trust.path().to_string_lossy().into_owned();
        let config = agent_args(&[
            "--ca-url",
            "https://ca.credlet-system.svc:8443",
            "--ca-trust",
            &trust_path,
            "--ca-timeout-ms",
            "2500",
        ])
        .expect("valid");
        let remote = config.remote_ca.expect("remote CA");
        assert_eq!(remote.url, "https://ca.credlet-system.svc:8443");
        assert_eq!(remote.timeout, Duration::from_millis(2500));
        assert_eq!(
            remote.token_file,
            PathBuf::from(credlet_csi::remote::DEFAULT_TOKEN_FILE)
        );
        for (flags, mention) in [
            (
                vec!["--ca-url", "http://ca:8443", "--ca-trust", &trust_path],
                "https",
            ),
            (vec!["--ca-url", "https://ca:8443"], "--ca-trust"),
            (
                vec!["--ca-url", "https://ca:8443/x", "--ca-trust", &trust_path],
                "path",
            ),
            (
                vec![
                    "--ca-url",
                    "https://ca:8443",
                    "--ca-trust",
                    "/nonexistent/ca.pem",
                ],
                "--ca-trust",
            ),
            (
                vec![
                    "--ca-url",
                    "https://ca:8443",
                    "--ca-trust",
                    &trust_path,
                    "--ca-timeout-ms",
                    "0",
                ],
                "--ca-timeout-ms",
            ),
            (
                vec![
                    "--ca-url",
                    "https://ca:8443",
                    "--ca-trust",
                    &trust_path,
                    "--ca-token-file",
                    "token",
                ],
                "--ca-token-file",
            ),
        ] {
            let error = agent_args(&flags).expect_err("invalid");
            assert!(error.0.contains(mention), "{flags:?}: {error}");
        }
    }
}
