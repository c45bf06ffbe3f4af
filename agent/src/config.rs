//! Command-line and environment configuration, validated before anything
//! starts. Invalid configuration exits with code 64 (`EX_USAGE`) and one
//! line naming the flag and its environment variable.
//!
//! Conventions every flag follows:
//! - its environment variable is `CREDLET_<FLAG>` ([`env_var`]), without
//!   exceptions (a test walks the whole command);
//! - durations are written `90s`, `5m`, `1h30m` (the grammar of
//!   [`credlet_csi::attributes::parse_duration`], also used by volume
//!   attributes);
//! - enumerated values are matched ignoring ASCII case;
//! - listen addresses are `ip:port`, or `:port` for every address.
//!
//! Flags renamed for these rules stay accepted, hidden, for one release and
//! log a deprecation warning when used ([`DEPRECATED_ENV`] for variables).

use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::logging::LogFormat;

/// Exit code for invalid configuration (`EX_USAGE` from sysexits.h).
pub const EXIT_CONFIG: u8 = 64;

/// The CA service's address inside the cluster the manifests install
/// (`deploy/ca`, the Helm chart): Service `credlet-ca` in `credlet-system`.
pub const DEFAULT_CA_URL: &str = "https://credlet-ca.credlet-system.svc:8443";

/// Where the manifests mount the roots of the CA service's serving
/// certificate (ConfigMap `credlet-ca-trust`).
pub const DEFAULT_CA_TRUST: &str = "/etc/credlet/ca-trust/ca.crt";

/// The environment variable of `flag` (`--ca-url` → `CREDLET_CA_URL`).
pub fn env_var(flag: &str) -> String {
    format!(
        "CREDLET_{}",
        flag.trim_start_matches('-')
            .to_ascii_uppercase()
            .replace('-', "_")
    )
}

/// `flag` with its environment variable, as every message names it:
/// `--ca-url (CREDLET_CA_URL)`.
pub fn named(flag: &str) -> String {
    format!("{flag} ({})", env_var(flag))
}

/// A configuration problem: the flags it concerns (each shown with its
/// environment variable) and what is wrong, on one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    flags: Vec<String>,
    problem: String,
}

impl ConfigError {
    /// A problem with `flag`'s value.
    pub fn new(flag: &str, problem: impl Into<String>) -> Self {
        Self::of(&[flag], problem)
    }

    /// A problem with several flags together.
    pub fn of(flags: &[&str], problem: impl Into<String>) -> Self {
        Self {
            flags: flags.iter().map(|f| (*f).to_owned()).collect(),
            problem: problem.into(),
        }
    }

    /// A problem not tied to a flag (an unknown flag, a missing mode).
    pub fn general(problem: impl Into<String>) -> Self {
        Self::of(&[], problem)
    }

    /// A socket path a flag names could not be bound (in use by a live
    /// process, not a socket, no permission).
    pub fn socket(flag: &str, error: &credlet_uds::socket::BindError) -> Self {
        Self::new(flag, error.to_string())
    }

    /// A TCP address a flag names could not be listened on.
    pub fn listen(flag: &str, addr: SocketAddr, error: &std::io::Error) -> Self {
        let problem = if error.kind() == std::io::ErrorKind::AddrInUse {
            format!("{addr} is in use by another process")
        } else {
            format!("cannot listen on {addr}: {error}")
        };
        Self::new(flag, problem)
    }

    /// The flags concerned.
    pub fn flags(&self) -> &[String] {
        &self.flags
    }

    /// What is wrong, without the flags.
    pub fn problem(&self) -> &str {
        &self.problem
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.flags.iter().map(|flag| named(flag)).collect();
        // One line, whatever the problem's source printed.
        let problem = self.problem.replace('\n', " ");
        if names.is_empty() {
            f.write_str(&problem)
        } else {
            write!(f, "{}: {problem}", names.join(" and "))
        }
    }
}

impl std::error::Error for ConfigError {}

/// Parses a duration flag: `90s`, `5m`, `1h30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    credlet_csi::attributes::parse_duration(text.trim())
}

/// Writes a duration the way flags take it (`1h30m`, `45s`; `250ms` below
/// a second, which only the deprecated millisecond flags can give).
pub fn format_duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    if secs == 0 && !duration.is_zero() {
        return format!("{}ms", duration.as_millis());
    }
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut text = String::new();
    if h > 0 {
        text += &format!("{h}h");
    }
    if m > 0 {
        text += &format!("{m}m");
    }
    if s > 0 || text.is_empty() {
        text += &format!("{s}s");
    }
    text
}

/// Parses a listen address: `ip:port`, `[v6]:port`, or `:port` for every
/// address (IPv6 and IPv4; IPv4 alone where the host has no IPv6, see
/// [`crate::health::bind`]).
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    let parsed = match text.strip_prefix(':') {
        Some(port) => port
            .parse::<u16>()
            .ok()
            .map(|port| SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))),
        None => text.parse().ok(),
    };
    parsed.ok_or_else(|| {
        format!("{text:?} must be ip:port or :port (every address), e.g. 0.0.0.0:8443 or :8443")
    })
}

/// A duration given by its flag, or by the deprecated integer flag it
/// replaced (clap keeps the two from being given together). Returns the
/// duration and the flag it came from, for messages.
fn with_deprecated(
    new: Duration,
    new_flag: &'static str,
    old: Option<u64>,
    old_flag: &'static str,
    unit: fn(u64) -> Duration,
) -> (Duration, &'static str) {
    match old {
        None => (new, new_flag),
        Some(value) => {
            let duration = unit(value);
            tracing::warn!(
                "{} is deprecated and will be removed in the next release; use {} {} instead",
                named(old_flag),
                named(new_flag),
                format_duration(duration)
            );
            (duration, old_flag)
        }
    }
}

/// Environment variables renamed to follow `CREDLET_<FLAG>`: (mode, flag,
/// old variable). For one release the old variable still sets the flag when
/// the new one is unset, with a warning.
pub const DEPRECATED_ENV: &[(&str, &str, &str)] = &[
    ("ca", "--listen", "CREDLET_CA_LISTEN"),
    ("ca", "--token-issuer", "CREDLET_TOKEN_ISSUERS"),
    ("ca", "--dns-template", "CREDLET_DNS_TEMPLATES"),
    ("ca", "--allowed-ip-cidr", "CREDLET_ALLOWED_IP_CIDRS"),
    ("ca", "--server-name", "CREDLET_SERVER_NAMES"),
    ("ca", "--signer-name", "CREDLET_SIGNER_NAMES"),
    (
        "agent",
        "--image-policy-namespace",
        "CREDLET_IMAGE_POLICY_NAMESPACES",
    ),
    ("demo", "--dir", "CREDLET_DEMO_DIR"),
];

/// The command to parse with, honouring the deprecated variables of
/// [`DEPRECATED_ENV`] that are set; returns it with the warnings to log
/// once logging is up.
pub fn command_with_deprecated_env(
    mut var: impl FnMut(&str) -> Option<std::ffi::OsString>,
) -> (clap::Command, Vec<String>) {
    let mut command = <Cli as clap::CommandFactory>::command();
    let mut warnings = Vec::new();
    for (mode, flag, old) in DEPRECATED_ENV {
        if var(old).is_none() {
            continue;
        }
        let new = env_var(flag);
        if var(&new).is_some() {
            warnings.push(format!(
                "{old} is ignored: {new} is set; remove {old}, which will stop working in the next release"
            ));
            continue;
        }
        let id = flag.trim_start_matches('-').replace('-', "_");
        command = command.mut_subcommand(*mode, |sub| sub.mut_arg(id, |arg| arg.env(*old)));
        warnings.push(format!(
            "{old} is deprecated and will stop working in the next release; rename it {new} ({flag})"
        ));
    }
    (command, warnings)
}

/// credlet: pod certificates and pull-credential verification for
/// Kubernetes nodes.
#[derive(Debug, Parser)]
#[command(name = "credlet", version, about, propagate_version = true)]
pub struct Cli {
    /// Log line format.
    #[arg(long, env = "CREDLET_LOG_FORMAT", value_enum, ignore_case = true, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Log filter when RUST_LOG is unset (e.g. `info`, `credlet_csi=debug`).
    #[arg(long, env = "CREDLET_LOG_LEVEL", default_value = "info", global = true)]
    pub log_level: String,
    /// Runtime threads. One suits a node agent: its work is short CPU
    /// bursts, and one thread avoids cross-thread wake-ups.
    #[arg(
        long,
        env = "CREDLET_WORKER_THREADS",
        default_value_t = 1,
        value_parser = clap::value_parser!(u16).range(1..=64),
        global = true
    )]
    pub worker_threads: u16,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Checks the global flags.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let level = self.log_level.trim();
        if level
            .parse::<tracing_subscriber::filter::LevelFilter>()
            .is_err()
            && tracing_subscriber::EnvFilter::try_new(level).is_err()
        {
            return Err(ConfigError::new(
                "--log-level",
                format!(
                    "{level:?} is neither a level (error, warn, info, debug, trace, off) nor a filter like credlet_csi=debug"
                ),
            ));
        }
        Ok(())
    }
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

/// The image guard's node-wide verification policy, as the flag spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ImagePolicy {
    /// Never verify: the kubelet's own behaviour.
    #[value(name = "NeverVerify")]
    NeverVerify,
    /// Verify every pull except images already on the node before credlet.
    #[value(name = "NeverVerifyPreloadedImages")]
    NeverVerifyPreloadedImages,
    /// Verify every pull except allowlisted repositories.
    #[value(name = "NeverVerifyAllowlistedImages")]
    NeverVerifyAllowlistedImages,
    /// Verify every pull.
    #[value(name = "AlwaysVerify")]
    AlwaysVerify,
}

impl From<ImagePolicy> for credlet_imageguard::policy::VerifyPolicy {
    fn from(policy: ImagePolicy) -> Self {
        match policy {
            ImagePolicy::NeverVerify => Self::NeverVerify,
            ImagePolicy::NeverVerifyPreloadedImages => Self::NeverVerifyPreloadedImages,
            ImagePolicy::NeverVerifyAllowlistedImages => Self::NeverVerifyAllowlistedImages,
            ImagePolicy::AlwaysVerify => Self::AlwaysVerify,
        }
    }
}

/// The image guard's mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GuardMode {
    /// Deny what the policy denies.
    Enforce,
    /// Decide, log, count and emit Events; never block.
    Audit,
}

impl From<GuardMode> for credlet_imageguard::policy::Mode {
    fn from(mode: GuardMode) -> Self {
        match mode {
            GuardMode::Enforce => Self::Enforce,
            GuardMode::Audit => Self::Audit,
        }
    }
}

/// How `credlet ca` verifies service account tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TokenVerification {
    /// A TokenReview per new token.
    TokenReview,
    /// Offline, against the service account issuer's keys.
    Jwks,
}

/// The PodCertificateRequest API version the signer uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SignerApiVersion {
    /// `v1` when the API server serves it, else `v1beta1`.
    Auto,
    /// `certificates.k8s.io/v1beta1`.
    V1beta1,
    /// `certificates.k8s.io/v1`.
    V1,
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
    /// address: `ip:port`, or `:port` for every address. Off when unset.
    #[arg(long, env = "CREDLET_HEALTH_LISTEN", value_parser = parse_listen)]
    pub health_listen: Option<SocketAddr>,
    /// Also export each volume's certificate expiry with its pod's labels
    /// (`credlet_csi_certificate_expiration_timestamp_seconds`): one series
    /// per volume, for small clusters.
    #[arg(long, env = "CREDLET_PER_VOLUME_METRICS")]
    pub per_volume_metrics: bool,
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
    /// `https://host:port`. Not with --dev-ca.
    #[arg(long, env = "CREDLET_CA_URL", default_value = DEFAULT_CA_URL, conflicts_with = "dev_ca")]
    pub ca_url: String,
    /// PEM bundle of the roots that sign the CA service's serving
    /// certificate.
    #[arg(long, env = "CREDLET_CA_TRUST", default_value = DEFAULT_CA_TRUST)]
    pub ca_trust: PathBuf,
    /// The agent's projected service account token for the CA's audience;
    /// read again on every use (the kubelet rotates it).
    #[arg(
        long,
        env = "CREDLET_CA_TOKEN_FILE",
        default_value = credlet_csi::remote::DEFAULT_TOKEN_FILE
    )]
    pub ca_token_file: PathBuf,
    /// Deadline of every call to the CA (`5s`; 1s-2m).
    #[arg(long, env = "CREDLET_CA_TIMEOUT", value_parser = parse_duration, default_value = "5s")]
    pub ca_timeout: Duration,
    /// Deprecated: --ca-timeout in milliseconds.
    #[arg(
        long,
        env = "CREDLET_CA_TIMEOUT_MS",
        hide = true,
        conflicts_with = "ca_timeout"
    )]
    pub ca_timeout_ms: Option<u64>,
    /// Write volumes into plain directories instead of tmpfs mounts, so the
    /// agent runs without root. Development only: keys then live on the
    /// directory's filesystem.
    #[arg(long, env = "CREDLET_PLAIN_DIRECTORIES")]
    pub plain_directories: bool,
    /// Size limit of each volume's tmpfs, in KiB.
    #[arg(long, env = "CREDLET_TMPFS_SIZE_KIB", default_value_t = 1024)]
    pub tmpfs_size_kib: u64,
    /// First retry delay after a failed renewal (`1s`).
    #[arg(long, env = "CREDLET_BACKOFF_BASE", value_parser = parse_duration, default_value = "1s")]
    pub backoff_base: Duration,
    /// Deprecated: --backoff-base in milliseconds.
    #[arg(
        long,
        env = "CREDLET_BACKOFF_BASE_MS",
        hide = true,
        conflicts_with = "backoff_base"
    )]
    pub backoff_base_ms: Option<u64>,
    /// Longest retry delay after failed renewals (`5m`).
    #[arg(long, env = "CREDLET_BACKOFF_CAP", value_parser = parse_duration, default_value = "5m")]
    pub backoff_cap: Duration,
    /// Deprecated: --backoff-cap in milliseconds.
    #[arg(
        long,
        env = "CREDLET_BACKOFF_CAP_MS",
        hide = true,
        conflicts_with = "backoff_cap"
    )]
    pub backoff_cap_ms: Option<u64>,
    /// Most renewals in flight at once.
    #[arg(long, env = "CREDLET_MAX_CONCURRENT_RENEWALS", default_value_t = 32)]
    pub max_concurrent_renewals: usize,
    /// Shortest certificate lifetime the development CA issues (`1s`).
    #[arg(long, env = "CREDLET_DEV_CA_MIN_DURATION", value_parser = parse_duration, default_value = "1s")]
    pub dev_ca_min_duration: Duration,
    /// Deprecated: --dev-ca-min-duration in seconds.
    #[arg(
        long,
        env = "CREDLET_DEV_CA_MIN_DURATION_S",
        hide = true,
        conflicts_with = "dev_ca_min_duration"
    )]
    pub dev_ca_min_duration_s: Option<u64>,
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
    /// Image guard: node-wide verification policy.
    #[arg(
        long,
        env = "CREDLET_IMAGE_POLICY",
        value_enum,
        ignore_case = true,
        default_value = "NeverVerifyPreloadedImages"
    )]
    pub image_policy: ImagePolicy,
    /// Image guard: per-namespace policy overrides, `namespace=Policy`.
    #[arg(long, env = "CREDLET_IMAGE_POLICY_NAMESPACE", value_delimiter = ',')]
    pub image_policy_namespace: Vec<String>,
    /// Image guard: repositories never verified under
    /// NeverVerifyAllowlistedImages (`registry/repo`, or `registry/path/*`).
    #[arg(long, env = "CREDLET_IMAGE_ALLOWLIST", value_delimiter = ',')]
    pub image_allowlist: Vec<String>,
    /// Image guard: `enforce`, or `audit` (decide, log, count and emit
    /// Events, never block).
    #[arg(
        long,
        env = "CREDLET_IMAGE_GUARD_MODE",
        value_enum,
        ignore_case = true,
        default_value = "enforce"
    )]
    pub image_guard_mode: GuardMode,
    /// Image guard: how long a positive verification holds (`24h`, `90m`).
    #[arg(long, env = "CREDLET_IMAGE_VERIFICATION_TTL", value_parser = parse_duration, default_value = "24h")]
    pub image_verification_ttl: Duration,
    /// Image guard: extra root CA files (PEM) to trust for registries.
    #[arg(long, env = "CREDLET_REGISTRY_CA", value_delimiter = ',')]
    pub registry_ca: Vec<PathBuf>,
    /// Image guard: the container runtime's registry configuration
    /// directory, containerd's `config_path` (e.g. `/etc/containerd/certs.d`;
    /// several separated by `:`, as there). Registry checks then go to the
    /// `hosts.toml` mirrors, with the per-host CAs, client certificates and
    /// plain-HTTP hosts the runtime pulls with; without it a node that pulls
    /// through a mirror denies every check. Registry requests also honour
    /// HTTPS_PROXY, HTTP_PROXY and NO_PROXY, as the runtime does.
    #[arg(long, env = "CREDLET_REGISTRY_CONFIG_DIR", value_delimiter = ':')]
    pub registry_config_dir: Vec<PathBuf>,
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
    /// The runtime's registry configuration directories (`hosts.toml`).
    pub registry_config_dirs: Vec<PathBuf>,
    /// Proxies of registry requests (HTTPS_PROXY, HTTP_PROXY, NO_PROXY).
    pub registry_proxy: credlet_imageguard::egress::ProxyEnv,
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
    #[arg(long, env = "CREDLET_DIR")]
    pub dir: Option<PathBuf>,
    /// Certificate lifetime in the demo (`4s`; 2s-1h).
    #[arg(long, env = "CREDLET_LIFETIME", value_parser = parse_duration, default_value = "4s")]
    pub lifetime: Duration,
    /// Deprecated: --lifetime in seconds.
    #[arg(
        long,
        env = "CREDLET_LIFETIME_S",
        hide = true,
        conflicts_with = "lifetime"
    )]
    pub lifetime_s: Option<u64>,
    /// Rotations to wait for before unpublishing (0-100).
    #[arg(long, env = "CREDLET_ROTATIONS", default_value_t = 2)]
    pub rotations: u32,
}

/// Validated `credlet demo` configuration.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Folder to publish into (`None`: a temporary one).
    pub dir: Option<PathBuf>,
    /// Certificate lifetime.
    pub lifetime: Duration,
    /// Rotations to wait for.
    pub rotations: u32,
}

impl DemoArgs {
    /// Checks the demo's flags.
    pub fn validate(&self) -> Result<DemoConfig, ConfigError> {
        let (lifetime, flag) = with_deprecated(
            self.lifetime,
            "--lifetime",
            self.lifetime_s,
            "--lifetime-s",
            Duration::from_secs,
        );
        if !(Duration::from_secs(2)..=Duration::from_secs(3600)).contains(&lifetime) {
            return Err(ConfigError::new(
                flag,
                format!("{} must be between 2s and 1h", format_duration(lifetime)),
            ));
        }
        if self.rotations > 100 {
            return Err(ConfigError::new(
                "--rotations",
                format!("{} must be at most 100", self.rotations),
            ));
        }
        Ok(DemoConfig {
            dir: self.dir.clone(),
            lifetime,
            rotations: self.rotations,
        })
    }
}

/// Validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// CSI socket path (`None`: CSI off).
    pub csi_socket: Option<PathBuf>,
    /// Health and metrics address (`None`: off).
    pub health_listen: Option<SocketAddr>,
    /// Per-volume expiry series on `/metrics`.
    pub per_volume_metrics: bool,
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
            return Err(ConfigError::of(
                &["--csi-endpoint", "--cri-listen"],
                "neither is set: nothing to serve (--csi-endpoint serves pod certificates, --cri-listen the image guard)",
            ));
        }
        if self.node_id.trim().is_empty() || self.node_id.len() > 253 {
            return Err(ConfigError::new(
                "--node-id",
                format!("{:?} must be 1-253 characters", self.node_id),
            ));
        }
        credlet_csi::server::validate_driver_name(&self.driver_name)
            .map_err(|e| ConfigError::new("--driver-name", e))?;
        if !is_trust_domain(&self.trust_domain) {
            return Err(ConfigError::new(
                "--trust-domain",
                format!(
                    "{:?} must be lowercase letters, digits, '.', '-' and '_'",
                    self.trust_domain
                ),
            ));
        }
        if self.token_audience.trim().is_empty() {
            return Err(ConfigError::new("--token-audience", "must not be empty"));
        }
        let remote_ca = if csi_socket.is_some() && !self.dev_ca {
            Some(self.remote_ca()?)
        } else {
            None
        };
        let registration = self.registration(csi_socket.as_deref())?;
        // Only volumes live under the kubelet root; the image guard alone
        // does not need it to exist.
        let kubelet_root = if csi_socket.is_some() {
            canonical_dir("--kubelet-root", &self.kubelet_root)?
        } else {
            self.kubelet_root.clone()
        };
        if !self.state_dir.is_absolute() {
            return Err(ConfigError::new(
                "--state-dir",
                format!("{:?} must be an absolute path", self.state_dir),
            ));
        }
        if !(64..=64 * 1024).contains(&self.tmpfs_size_kib) {
            return Err(ConfigError::new(
                "--tmpfs-size-kib",
                format!("{} must be between 64 and 65536", self.tmpfs_size_kib),
            ));
        }
        let (backoff_base, base_flag) = with_deprecated(
            self.backoff_base,
            "--backoff-base",
            self.backoff_base_ms,
            "--backoff-base-ms",
            Duration::from_millis,
        );
        let (backoff_cap, cap_flag) = with_deprecated(
            self.backoff_cap,
            "--backoff-cap",
            self.backoff_cap_ms,
            "--backoff-cap-ms",
            Duration::from_millis,
        );
        if backoff_base.is_zero() {
            return Err(ConfigError::new(base_flag, "must be above 0"));
        }
        if backoff_base > backoff_cap {
            return Err(ConfigError::of(
                &[base_flag, cap_flag],
                format!(
                    "the first retry delay {} is above the longest {}",
                    format_duration(backoff_base),
                    format_duration(backoff_cap)
                ),
            ));
        }
        if !(1..=4096).contains(&self.max_concurrent_renewals) {
            return Err(ConfigError::new(
                "--max-concurrent-renewals",
                format!(
                    "{} must be between 1 and 4096",
                    self.max_concurrent_renewals
                ),
            ));
        }
        let (dev_ca_min_duration, min_flag) = with_deprecated(
            self.dev_ca_min_duration,
            "--dev-ca-min-duration",
            self.dev_ca_min_duration_s,
            "--dev-ca-min-duration-s",
            Duration::from_secs,
        );
        if dev_ca_min_duration.is_zero() {
            return Err(ConfigError::new(min_flag, "must be at least 1s"));
        }
        if csi_socket.is_some() && !self.plain_directories && !rustix::process::geteuid().is_root()
        {
            return Err(ConfigError::new(
                "--plain-directories",
                "not set, and mounting tmpfs volumes needs root (CAP_SYS_ADMIN): run as root, or pass --plain-directories for development",
            ));
        }
        Ok(AgentConfig {
            csi_socket,
            health_listen: self.health_listen,
            per_volume_metrics: self.per_volume_metrics,
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
            backoff_base,
            backoff_cap,
            max_concurrent_renewals: self.max_concurrent_renewals,
            dev_ca_min_duration,
            remote_ca,
        })
    }

    fn registration(
        &self,
        csi_socket: Option<&Path>,
    ) -> Result<Option<credlet_csi::registration::RegistrationConfig>, ConfigError> {
        let Some(dir) = &self.registration_dir else {
            if self.kubelet_registration_path.is_some() {
                return Err(ConfigError::new(
                    "--kubelet-registration-path",
                    "only applies with --registration-dir",
                ));
            }
            return Ok(None);
        };
        let Some(csi_socket) = csi_socket else {
            return Err(ConfigError::new(
                "--registration-dir",
                "registers the CSI driver: it needs --csi-endpoint",
            ));
        };
        if !dir.is_absolute() {
            return Err(ConfigError::new(
                "--registration-dir",
                format!("{:?} must be an absolute path", dir),
            ));
        }
        if !dir.is_dir() {
            return Err(ConfigError::new(
                "--registration-dir",
                format!(
                    "{} is not a directory (the kubelet creates <kubelet root>/plugins_registry)",
                    dir.display()
                ),
            ));
        }
        let endpoint = match &self.kubelet_registration_path {
            Some(path) if !path.is_absolute() => {
                return Err(ConfigError::new(
                    "--kubelet-registration-path",
                    format!("{path:?} must be an absolute path"),
                ));
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

    fn remote_ca(&self) -> Result<RemoteCaConfig, ConfigError> {
        let url = self.ca_url.trim();
        let bad_url = |why: &str| ConfigError::new("--ca-url", format!("{url:?} {why}"));
        let uri: tonic::transport::Uri = url
            .parse()
            .map_err(|e| bad_url(&format!("is not a URL: {e}")))?;
        if uri.scheme_str() != Some("https") || uri.host().is_none_or(str::is_empty) {
            return Err(bad_url("must be https://host:port"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad_url("must not have a path"));
        }
        let trust = &self.ca_trust;
        let trust_pem = std::fs::read_to_string(trust).map_err(|e| {
            ConfigError::new(
                "--ca-trust",
                format!(
                    "cannot read {}: {e}; it holds the roots of the CA service's serving certificate (or pass --dev-ca for local testing)",
                    trust.display()
                ),
            )
        })?;
        if !trust_pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(ConfigError::new(
                "--ca-trust",
                format!("{} holds no PEM certificate", trust.display()),
            ));
        }
        if !self.ca_token_file.is_absolute() {
            return Err(ConfigError::new(
                "--ca-token-file",
                format!("{:?} must be an absolute path", self.ca_token_file),
            ));
        }
        let (timeout, flag) = with_deprecated(
            self.ca_timeout,
            "--ca-timeout",
            self.ca_timeout_ms,
            "--ca-timeout-ms",
            Duration::from_millis,
        );
        // The deprecated flag keeps its old floor of 100 ms.
        let shortest = if self.ca_timeout_ms.is_some() {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(1)
        };
        if !(shortest..=Duration::from_secs(120)).contains(&timeout) {
            return Err(ConfigError::new(
                flag,
                format!(
                    "{} must be between {} and 2m",
                    format_duration(timeout),
                    format_duration(shortest)
                ),
            ));
        }
        Ok(RemoteCaConfig {
            url: url.to_owned(),
            trust_pem,
            token_file: self.ca_token_file.clone(),
            timeout,
        })
    }

    fn image_guard(&self, listen: &str) -> Result<ImageGuardConfig, ConfigError> {
        use credlet_imageguard::policy::{GuardPolicy, VerifyPolicy};
        use credlet_imageguard::reference::Allowlist;
        let listen = socket_path("--cri-listen", listen)?;
        let upstream = socket_path("--cri-upstream", &self.cri_upstream)?;
        if listen == upstream {
            return Err(ConfigError::of(
                &["--cri-listen", "--cri-upstream"],
                format!("both are {}: they must differ", listen.display()),
            ));
        }
        let mut namespaces = std::collections::HashMap::new();
        for entry in &self.image_policy_namespace {
            let bad = |why: String| {
                ConfigError::new("--image-policy-namespace", format!("{entry:?}: {why}"))
            };
            let (ns, policy) = entry
                .split_once('=')
                .ok_or_else(|| bad("must be namespace=Policy".into()))?;
            let policy: VerifyPolicy = policy.parse().map_err(|e| bad(format!("{e}")))?;
            namespaces.insert(ns.trim().to_owned(), policy);
        }
        let allowlist = Allowlist::parse(&self.image_allowlist)
            .map_err(|e| ConfigError::new("--image-allowlist", e.to_string()))?;
        if !self.image_records_dir.is_absolute() {
            return Err(ConfigError::new(
                "--image-records-dir",
                format!("{:?} must be an absolute path", self.image_records_dir),
            ));
        }
        let mut registry_roots = Vec::new();
        for path in &self.registry_ca {
            let pem = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(
                    "--registry-ca",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            registry_roots.push(pem);
        }
        for dir in &self.registry_config_dir {
            if !dir.is_absolute() {
                return Err(ConfigError::new(
                    "--registry-config-dir",
                    format!("{:?} must be an absolute path", dir),
                ));
            }
            if !dir.is_dir() {
                return Err(ConfigError::new(
                    "--registry-config-dir",
                    format!("{} is not a directory", dir.display()),
                ));
            }
        }
        // Every hosts.toml and the files it names, as checks will read them.
        credlet_imageguard::registry::check_registry_config(&self.registry_config_dir)
            .map_err(|e| ConfigError::new("--registry-config-dir", e.to_string()))?;
        let registry_proxy = credlet_imageguard::egress::ProxyEnv::from_env()
            .map_err(|e| ConfigError::general(format!("registry proxy: {e}")))?;
        Ok(ImageGuardConfig {
            listen,
            upstream,
            policy: GuardPolicy {
                default: self.image_policy.into(),
                namespaces,
                allowlist,
                mode: self.image_guard_mode.into(),
                ttl: self.image_verification_ttl,
            },
            registry_roots,
            registry_config_dirs: self.registry_config_dir.clone(),
            registry_proxy,
            records_dir: self.image_records_dir.clone(),
            kubeconfig: self.kubeconfig.clone(),
        })
    }
}

fn socket_path(flag: &str, raw: &str) -> Result<PathBuf, ConfigError> {
    let path = PathBuf::from(raw.strip_prefix("unix://").unwrap_or(raw));
    if !path.is_absolute() {
        return Err(ConfigError::new(
            flag,
            format!("{raw:?} must be an absolute socket path"),
        ));
    }
    Ok(path)
}

fn canonical_dir(flag: &str, path: &Path) -> Result<PathBuf, ConfigError> {
    let canonical = path
        .canonicalize()
        .map_err(|e| ConfigError::new(flag, format!("{}: {e}", path.display())))?;
    if !canonical.is_dir() {
        return Err(ConfigError::new(
            flag,
            format!("{} is not a directory", path.display()),
        ));
    }
    Ok(canonical)
}

/// Checks that `path` is a regular file this process can open.
fn readable_file(flag: &str, path: &Path) -> Result<PathBuf, ConfigError> {
    let file = std::fs::File::open(path)
        .map_err(|e| ConfigError::new(flag, format!("cannot read {}: {e}", path.display())))?;
    let is_file = file.metadata().is_ok_and(|m| m.is_file());
    if !is_file {
        return Err(ConfigError::new(
            flag,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(path.to_path_buf())
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
    /// Address to serve gRPC over TLS on: `ip:port`, or `:port` for every
    /// address.
    #[arg(long, env = "CREDLET_LISTEN", value_parser = parse_listen, default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
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
        value_enum,
        ignore_case = true,
        default_value = "token-review"
    )]
    pub token_verification: TokenVerification,
    /// With `--token-verification jwks`: an issuer (`iss`) tokens may name
    /// (repeatable: every `--service-account-issuer` of the API server
    /// while it migrates issuers). Default: the `issuer` of the API
    /// server's `/.well-known/openid-configuration`.
    #[arg(long, env = "CREDLET_TOKEN_ISSUER", value_delimiter = ',')]
    pub token_issuer: Vec<String>,
    /// With `--token-verification jwks`: how often the issuer keys are
    /// fetched again (`5m`, at least `10s`); a token signed with an unknown
    /// key id fetches them at once, at most every 10 s.
    #[arg(long, env = "CREDLET_JWKS_REFRESH", value_parser = parse_duration, default_value = "5m")]
    pub jwks_refresh: Duration,
    /// The agent's service account, `namespace/name`; only its tokens get
    /// agent client certificates.
    #[arg(
        long,
        env = "CREDLET_AGENT_SERVICE_ACCOUNT",
        default_value = "credlet-system/credlet-agent"
    )]
    pub agent_service_account: String,
    /// Longest certificate lifetime; longer requests are shortened
    /// (`2160h`, `24h`).
    #[arg(long, env = "CREDLET_MAX_DURATION", value_parser = parse_duration, default_value = "2160h")]
    pub max_duration: Duration,
    /// Lifetime when a request asks for none, and of agent certificates.
    #[arg(long, env = "CREDLET_DEFAULT_DURATION", value_parser = parse_duration, default_value = "24h")]
    pub default_duration: Duration,
    /// Shortest certificate lifetime; shorter requests are lengthened
    /// (`30s`, `1h`). Default: 1 h, or --max-duration if that is shorter.
    /// Lifetimes of minutes or less are a test and benchmark setting: they
    /// make every pod renew that often.
    #[arg(long, env = "CREDLET_MIN_DURATION", value_parser = parse_duration)]
    pub min_duration: Option<Duration>,
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
    #[arg(long, env = "CREDLET_DNS_TEMPLATE", value_delimiter = ',')]
    pub dns_template: Vec<String>,
    /// Range IP SANs may come from (repeatable CIDR); none by default.
    #[arg(long, env = "CREDLET_ALLOWED_IP_CIDR", value_delimiter = ',')]
    pub allowed_ip_cidr: Vec<String>,
    /// DNS name or IP address of the serving certificate (repeatable): the
    /// names agents dial, by default those of the Service the manifests
    /// install.
    #[arg(
        long,
        env = "CREDLET_SERVER_NAME",
        value_delimiter = ',',
        default_values = ["credlet-ca.credlet-system.svc", "credlet-ca.credlet-system.svc.cluster.local"]
    )]
    pub server_name: Vec<String>,
    /// Kubeconfig for TokenReviews and pod lookups (default: in-cluster, or
    /// $KUBECONFIG).
    #[arg(long, env = "CREDLET_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Longest wait for in-flight requests on SIGTERM (`30s`).
    #[arg(long, env = "CREDLET_DRAIN_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    pub drain_timeout: Duration,
    /// Deprecated: --drain-timeout in seconds.
    #[arg(
        long,
        env = "CREDLET_DRAIN_TIMEOUT_S",
        hide = true,
        conflicts_with = "drain_timeout"
    )]
    pub drain_timeout_s: Option<u64>,
    /// Signer name of PodCertificateRequests to answer (repeatable), e.g.
    /// `credlet.io/pods`. None: the PodCertificateRequest signer is off.
    #[arg(long, env = "CREDLET_SIGNER_NAME", value_delimiter = ',')]
    pub signer_name: Vec<String>,
    /// PodCertificateRequest API version: `auto` (v1 when the server
    /// serves it, else v1beta1), `v1beta1` or `v1`.
    #[arg(
        long,
        env = "CREDLET_SIGNER_API_VERSION",
        value_enum,
        ignore_case = true,
        default_value = "auto"
    )]
    pub signer_api_version: SignerApiVersion,
    /// PodCertificateRequests handled at once (1-256).
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
        default_value = "credlet-system"
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
        value_parser = parse_duration,
        default_value = "15s"
    )]
    pub leader_election_lease_duration: Duration,
    /// How long the leader keeps writing without a successful renewal
    /// (below the lease duration).
    #[arg(
        long,
        env = "CREDLET_LEADER_ELECTION_RENEW_DEADLINE",
        value_parser = parse_duration,
        default_value = "10s"
    )]
    pub leader_election_renew_deadline: Duration,
    /// Interval of Lease acquisition attempts and renewals (below the renew
    /// deadline).
    #[arg(
        long,
        env = "CREDLET_LEADER_ELECTION_RETRY_PERIOD",
        value_parser = parse_duration,
        default_value = "2s"
    )]
    pub leader_election_retry_period: Duration,
    /// Address of the `/metrics`, `/healthz` and `/readyz` HTTP server:
    /// `ip:port`, or `:port` for every address; empty: not served. Loopback
    /// by default: the server has no authentication, so reaching it from
    /// the network (for the kubelet's probes and a scraper, `:9090`) is an
    /// explicit choice.
    #[arg(long, env = "CREDLET_METRICS_LISTEN", default_value = "127.0.0.1:9090")]
    pub metrics_listen: String,
}

/// Validated `credlet ca` configuration.
#[derive(Debug, Clone)]
pub struct CaConfig {
    /// Listening address.
    pub listen: SocketAddr,
    /// Everything the CA service needs.
    pub settings: credlet_ca_service::Settings,
    /// Kubeconfig path, if not in-cluster / $KUBECONFIG.
    pub kubeconfig: Option<PathBuf>,
    /// Drain bound on shutdown.
    pub drain_timeout: Duration,
    /// The PodCertificateRequest signer, if `--signer-name` is given.
    pub signer: Option<credlet_signer::SignerRuntimeSettings>,
    /// Where to serve metrics and probes, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

impl CaArgs {
    /// Checks every flag; the error names the flag.
    pub fn validate(&self) -> Result<CaConfig, ConfigError> {
        use credlet_ca_service::policy::{IpRange, ServiceAccountRef};
        let files = credlet_ca_service::KeyFiles {
            cert: readable_file("--ca-cert", &self.ca_cert)?,
            key: readable_file("--ca-key", &self.ca_key)?,
            chain: self
                .ca_chain
                .as_deref()
                .map(|p| readable_file("--ca-chain", p))
                .transpose()?,
        };
        if !is_trust_domain(&self.trust_domain) {
            return Err(ConfigError::new(
                "--trust-domain",
                format!(
                    "{:?} must be lowercase letters, digits, '.', '-' and '_'",
                    self.trust_domain
                ),
            ));
        }
        if self.token_audience.trim().is_empty() {
            return Err(ConfigError::new("--token-audience", "must not be empty"));
        }
        let mut policy = credlet_ca_service::ServicePolicy::new(self.trust_domain.clone());
        policy.agent_service_account = ServiceAccountRef::parse(&self.agent_service_account)
            .map_err(|e| ConfigError::new("--agent-service-account", e.to_string()))?;
        policy.max_duration = self.max_duration;
        policy.default_duration = self.default_duration;
        match self.min_duration {
            Some(min) => {
                if min > self.max_duration {
                    return Err(ConfigError::of(
                        &["--min-duration", "--max-duration"],
                        format!(
                            "the shortest lifetime {} must not be above the longest {}",
                            format_duration(min),
                            format_duration(self.max_duration)
                        ),
                    ));
                }
                policy.min_duration = min;
            }
            None => policy.min_duration = policy.min_duration.min(policy.max_duration),
        }
        policy.agent_duration = policy.default_duration;
        if self.renewal_spread_percent > credlet_ca_service::policy::MAX_RENEWAL_SPREAD_PERCENT {
            return Err(ConfigError::new(
                "--renewal-spread-percent",
                format!(
                    "{} must be 0-{}",
                    self.renewal_spread_percent,
                    credlet_ca_service::policy::MAX_RENEWAL_SPREAD_PERCENT
                ),
            ));
        }
        policy.renewal_spread_percent = self.renewal_spread_percent;
        for template in &self.dns_template {
            policy
                .add_dns_template(template)
                .map_err(|e| ConfigError::new("--dns-template", e.to_string()))?;
        }
        for cidr in &self.allowed_ip_cidr {
            policy.ip_ranges.push(
                IpRange::parse(cidr)
                    .map_err(|e| ConfigError::new("--allowed-ip-cidr", e.to_string()))?,
            );
        }
        policy.validate().map_err(|e| {
            ConfigError::of(
                &[
                    "--min-duration",
                    "--max-duration",
                    "--renewal-spread-percent",
                ],
                e.to_string(),
            )
        })?;
        if self.server_name.iter().any(|n| n.trim().is_empty()) {
            return Err(ConfigError::new("--server-name", "must not be empty"));
        }
        let server_names = credlet_ca_service::ServerNames::parse(&self.server_name);
        let signer = self.signer_settings(&policy)?;
        let metrics_listen = match self.metrics_listen.trim() {
            "" => None,
            text => Some(parse_listen(text).map_err(|e| ConfigError::new("--metrics-listen", e))?),
        };
        let jwks = self.jwks_settings()?;
        let (drain_timeout, _) = with_deprecated(
            self.drain_timeout,
            "--drain-timeout",
            self.drain_timeout_s,
            "--drain-timeout-s",
            Duration::from_secs,
        );
        let mut settings = credlet_ca_service::Settings::new(
            files,
            policy,
            self.token_audience.clone(),
            server_names,
        );
        settings.jwks = jwks;
        Ok(CaConfig {
            listen: self.listen,
            settings,
            kubeconfig: self.kubeconfig.clone(),
            drain_timeout,
            signer,
            metrics_listen,
        })
    }

    /// Offline token verification settings; `None` with
    /// `--token-verification token-review`.
    fn jwks_settings(&self) -> Result<Option<credlet_ca_service::JwksSettings>, ConfigError> {
        match self.token_verification {
            TokenVerification::TokenReview => {
                if !self.token_issuer.is_empty() {
                    return Err(ConfigError::new(
                        "--token-issuer",
                        "only applies with --token-verification jwks",
                    ));
                }
                Ok(None)
            }
            TokenVerification::Jwks => {
                let mut settings =
                    credlet_ca_service::JwksSettings::new(self.token_audience.clone());
                for issuer in &self.token_issuer {
                    let issuer = issuer.trim();
                    if issuer.is_empty() || issuer.chars().any(char::is_whitespace) {
                        return Err(ConfigError::new(
                            "--token-issuer",
                            format!(
                                "{issuer:?} must be a service account issuer URL, e.g. https://kubernetes.default.svc.cluster.local"
                            ),
                        ));
                    }
                    settings.issuers.push(issuer.to_owned());
                }
                if self.jwks_refresh < Duration::from_secs(10) {
                    return Err(ConfigError::new(
                        "--jwks-refresh",
                        format!(
                            "{} must be at least 10s",
                            format_duration(self.jwks_refresh)
                        ),
                    ));
                }
                settings.refresh_interval = self.jwks_refresh;
                Ok(Some(settings))
            }
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
                return Err(ConfigError::new(
                    "--signer-name",
                    format!("{name:?} must be <domain>/<path>, e.g. credlet.io/pods"),
                ));
            }
        }
        if policy.max_duration < credlet_signer::controller::MIN_LIFETIME {
            return Err(ConfigError::of(
                &["--max-duration", "--signer-name"],
                format!(
                    "{} is below the 1h the PodCertificateRequest API requires; raise it or drop --signer-name",
                    format_duration(policy.max_duration)
                ),
            ));
        }
        if !(1..=256).contains(&self.signer_workers) {
            return Err(ConfigError::new(
                "--signer-workers",
                format!("{} must be 1-256", self.signer_workers),
            ));
        }
        let identity = match &self.leader_election_identity {
            Some(identity) => identity.trim().to_owned(),
            None => default_identity(),
        };
        if identity.is_empty() {
            return Err(ConfigError::new(
                "--leader-election-identity",
                "is empty, and neither $POD_NAME nor the host name is set",
            ));
        }
        let max_identity = credlet_signer::controller::MAX_REPORTING_INSTANCE_LEN;
        if identity.len() > max_identity {
            return Err(ConfigError::new(
                "--leader-election-identity",
                format!(
                    "is {} characters; Events allow at most {max_identity}",
                    identity.len()
                ),
            ));
        }
        let mut signer = SignerSettings::new(names.clone(), identity.clone());
        signer.api_version = match self.signer_api_version {
            SignerApiVersion::Auto => "auto",
            SignerApiVersion::V1beta1 => "v1beta1",
            SignerApiVersion::V1 => "v1",
        }
        .parse()
        .map_err(|e: credlet_signer::SignerError| {
            ConfigError::new("--signer-api-version", e.to_string())
        })?;
        signer.workers = self.signer_workers;
        signer
            .validate()
            .map_err(|e| ConfigError::new("--signer-name", e.to_string()))?;
        let mut lease = LeaseSettings::new(
            self.leader_election_namespace.trim(),
            self.leader_election_lease_name.trim(),
            identity,
        );
        lease.lease_duration = self.leader_election_lease_duration;
        lease.renew_deadline = self.leader_election_renew_deadline;
        lease.retry_period = self.leader_election_retry_period;
        if lease.renew_deadline >= lease.lease_duration {
            return Err(ConfigError::of(
                &[
                    "--leader-election-renew-deadline",
                    "--leader-election-lease-duration",
                ],
                format!(
                    "the renew deadline {} must be below the lease duration {}",
                    format_duration(lease.renew_deadline),
                    format_duration(lease.lease_duration)
                ),
            ));
        }
        if lease.retry_period >= lease.renew_deadline {
            return Err(ConfigError::of(
                &[
                    "--leader-election-retry-period",
                    "--leader-election-renew-deadline",
                ],
                format!(
                    "the retry period {} must be below the renew deadline {}",
                    format_duration(lease.retry_period),
                    format_duration(lease.renew_deadline)
                ),
            ));
        }
        lease.validate().map_err(|e| {
            ConfigError::of(
                &[
                    "--leader-election-namespace",
                    "--leader-election-lease-name",
                ],
                e.to_string(),
            )
        })?;
        let suffix = self.trust_bundle_suffix.trim();
        let publisher = if suffix.is_empty() {
            None
        } else {
            if !is_bundle_suffix(suffix) {
                return Err(ConfigError::new(
                    "--trust-bundle-suffix",
                    format!("{suffix:?} must be lowercase letters, digits, '-' and '.'"),
                ));
            }
            let mut publisher = PublisherSettings::new(names);
            publisher.name_suffix = suffix.to_owned();
            publisher
                .validate()
                .map_err(|e| ConfigError::new("--trust-bundle-suffix", e.to_string()))?;
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
        let error =
            ca_args(&["--min-duration", "2h", "--max-duration", "1h"]).expect_err("invalid");
        assert!(
            error
                .to_string()
                .contains("must not be above the longest 1h"),
            "{error}"
        );
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
            (&["--token-issuer", "https://x"][..], "only applies with"),
            (
                &["--token-verification", "jwks", "--token-issuer", "a b"],
                "--token-issuer",
            ),
            (
                &["--token-verification", "jwks", "--jwks-refresh", "1s"],
                "at least 10s",
            ),
        ] {
            let error = ca_args(flags).expect_err("invalid");
            assert!(error.to_string().contains(mention), "{flags:?}: {error}");
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
        assert!(error.to_string().contains("must be 0-40"), "{error}");
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
        assert_eq!(lease.namespace, "credlet-system");
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
            (&["--signer-workers", "0"], "--signer-workers"),
            (&["--max-duration", "30m"], "--max-duration"),
            (
                &["--leader-election-renew-deadline", "20s"],
                "renew deadline",
            ),
            (&["--leader-election-retry-period", "10s"], "retry period"),
            (
                &["--leader-election-identity", " "],
                "--leader-election-identity",
            ),
            (&["--trust-bundle-suffix", "A:b"], "--trust-bundle-suffix"),
            (&["--metrics-listen", "localhost"], "--metrics-listen"),
        ] {
            let error = signer(flags).expect_err("invalid");
            assert!(error.to_string().contains(mention), "{flags:?}: {error}");
        }
    }

    #[test]
    fn the_ca_defaults_to_the_manifests_service() {
        // Without --ca-url: the in-cluster CA Service, with its roots where
        // the manifests mount them (absent here).
        let error = agent_args(&[]).expect_err("no trust file");
        assert_eq!(error.flags(), ["--ca-trust"]);
        assert!(error.problem().contains(DEFAULT_CA_TRUST), "{error}");
        assert!(error.problem().contains("--dev-ca"), "{error}");
        let trust = trust_file();
        let trust_path = trust.path().to_string_lossy().into_owned();
        let remote = agent_args(&["--ca-trust", &trust_path])
            .expect("valid")
            .remote_ca
            .expect("remote CA");
        assert_eq!(remote.url, DEFAULT_CA_URL);
        assert_eq!(remote.timeout, Duration::from_secs(5));
        assert!(
            agent_args(&["--dev-ca"])
                .expect("valid")
                .remote_ca
                .is_none()
        );
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
            "--ca-timeout",
            "3s",
        ])
        .expect("valid");
        let remote = config.remote_ca.expect("remote CA");
        assert_eq!(remote.url, "https://ca.credlet-system.svc:8443");
        assert_eq!(remote.timeout, Duration::from_secs(3));
        assert_eq!(
            remote.token_file,
            PathBuf::from(credlet_csi::remote::DEFAULT_TOKEN_FILE)
        );
        for (flags, mention) in [
            (
                vec!["--ca-url", "http://ca:8443", "--ca-trust", &trust_path],
                "https",
            ),
            (
                vec!["--ca-url", "https://ca:8443", "--ca-trust", "/nonexistent"],
                "--ca-trust",
            ),
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
                    "50",
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
            assert!(error.to_string().contains(mention), "{flags:?}: {error}");
        }
    }

    /// Every flag of every mode, with the mode (`""` for global flags) and
    /// whether it is hidden (a deprecated alias).
    fn all_flags() -> Vec<(String, clap::Arg)> {
        let command = <Cli as clap::CommandFactory>::command();
        let mut flags: Vec<(String, clap::Arg)> = command
            .get_arguments()
            .map(|a| (String::new(), a.clone()))
            .collect();
        for sub in command.get_subcommands() {
            flags.extend(
                sub.get_arguments()
                    .filter(|a| !a.is_global_set())
                    .map(|a| (sub.get_name().to_owned(), a.clone())),
            );
        }
        flags
            .into_iter()
            .filter(|(_, a)| !matches!(a.get_id().as_str(), "help" | "version"))
            .collect()
    }

    #[test]
    fn every_flag_has_the_variable_credlet_flag() {
        let flags = all_flags();
        assert!(flags.len() > 60, "{} flags", flags.len());
        for (mode, arg) in flags {
            let long = arg.get_long().expect("every option is a --flag");
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            assert_eq!(
                env,
                Some(env_var(&format!("--{long}"))),
                "credlet {mode} --{long}"
            );
        }
    }

    #[test]
    fn deprecated_variables_still_set_their_flag() {
        for (mode, flag, old) in DEPRECATED_ENV {
            let (command, warnings) = command_with_deprecated_env(|name| {
                (name == *old).then(|| std::ffi::OsString::from("x"))
            });
            let sub = command.find_subcommand(mode).expect("mode");
            let arg = sub
                .get_arguments()
                .find(|a| a.get_long() == flag.strip_prefix("--"))
                .expect("flag");
            assert_eq!(arg.get_env(), Some(std::ffi::OsStr::new(old)), "{flag}");
            assert_eq!(warnings.len(), 1);
            assert!(warnings[0].contains(&env_var(flag)), "{}", warnings[0]);
            // The new variable wins when both are set.
            let (command, warnings) = command_with_deprecated_env(|name| {
                (name == *old || name == env_var(flag)).then(|| std::ffi::OsString::from("x"))
            });
            let sub = command.find_subcommand(mode).expect("mode");
            let arg = sub
                .get_arguments()
                .find(|a| a.get_long() == flag.strip_prefix("--"))
                .expect("flag");
            assert_eq!(
                arg.get_env().map(|e| e.to_string_lossy().into_owned()),
                Some(env_var(flag))
            );
            assert!(warnings[0].contains("ignored"), "{}", warnings[0]);
        }
    }

    /// The manifests (kustomize, Helm, the node service) use current flag
    /// and variable names only, none of the deprecated ones.
    #[test]
    fn manifests_use_current_flags_and_variables() {
        let visible: std::collections::HashSet<String> = all_flags()
            .into_iter()
            .filter(|(_, a)| !a.is_hide_set())
            .filter_map(|(_, a)| a.get_long().map(str::to_owned))
            .collect();
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let mut files = vec![deploy.clone()];
        let mut checked = 0;
        while let Some(path) = files.pop() {
            if path.is_dir() {
                files.extend(
                    std::fs::read_dir(&path)
                        .expect("read dir")
                        .map(|e| e.expect("entry").path()),
                );
                continue;
            }
            let name = path.to_string_lossy().into_owned();
            if ![".yaml", ".tpl", ".txt", ".service", ".example"]
                .iter()
                .any(|ext| name.ends_with(ext))
            {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read");
            for line in text.lines() {
                if let Some(arg) = line.trim_start().strip_prefix("- --") {
                    let flag: String = arg
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
                        .collect();
                    assert!(
                        visible.contains(&flag),
                        "{name}: --{flag} is not a current flag"
                    );
                    checked += 1;
                }
                for (at, _) in line.match_indices("CREDLET_") {
                    let var: String = line[at..]
                        .chars()
                        .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                        .collect();
                    if var == "CREDLET_" {
                        continue;
                    }
                    let flag = var["CREDLET_".len()..]
                        .to_ascii_lowercase()
                        .replace('_', "-");
                    assert!(
                        visible.contains(&flag),
                        "{name}: {var} is not a current variable"
                    );
                    checked += 1;
                }
            }
        }
        assert!(
            checked > 50,
            "only {checked} flags and variables found under {}",
            deploy.display()
        );
    }

    #[test]
    fn durations_and_listen_addresses() {
        for (text, secs, shown) in [
            ("90s", 90, "1m30s"),
            ("5m", 300, "5m"),
            ("1h30m", 5400, "1h30m"),
            (" 2160h", 7_776_000, "2160h"),
        ] {
            let duration = parse_duration(text).expect(text);
            assert_eq!(duration, Duration::from_secs(secs));
            assert_eq!(format_duration(duration), shown);
        }
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::ZERO), "0s");
        for bad in ["", "5", "5ms", "1d", "-1s", "0s", "soon"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_listen(":8443"),
            Ok(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 8443)))
        );
        assert_eq!(
            parse_listen("0.0.0.0:9808"),
            Ok("0.0.0.0:9808".parse().unwrap())
        );
        assert_eq!(
            parse_listen("[::1]:9808"),
            Ok("[::1]:9808".parse().unwrap())
        );
        for bad in [
            "localhost:8443",
            "8443",
            ":",
            ":http",
            "127.0.0.1",
            ":65536",
        ] {
            assert!(parse_listen(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn enumerated_values_ignore_case() {
        let cli = Cli::try_parse_from(["credlet", "--log-format", "JSON", "demo"]).expect("parses");
        assert_eq!(cli.log_format, LogFormat::Json);
        let config = ca_args(&[
            "--token-verification",
            "JWKS",
            "--signer-name",
            "credlet.io/pods",
            "--leader-election-identity",
            "ca-0",
            "--signer-api-version",
            "V1Beta1",
        ])
        .expect("valid");
        assert!(config.settings.jwks.is_some());
        assert_eq!(
            config.signer.expect("signer").signer.api_version,
            "v1beta1".parse().expect("api version")
        );
        let cli = Cli::try_parse_from([
            "credlet",
            "agent",
            "--node-id",
            "n",
            "--image-policy",
            "alwaysverify",
            "--image-guard-mode",
            "AUDIT",
        ])
        .expect("parses");
        let Command::Agent(agent) = cli.command else {
            panic!("not the agent command");
        };
        assert_eq!(agent.image_policy, ImagePolicy::AlwaysVerify);
        assert_eq!(agent.image_guard_mode, GuardMode::Audit);
    }

    #[test]
    fn registry_config_dir_is_read_at_start() {
        let dir = tempfile::tempdir().expect("tmp");
        let certs = dir.path().to_string_lossy().into_owned();
        let guard = |extra: &[&str]| {
            let mut args = vec!["--dev-ca", "--cri-listen", "/run/credlet-test/cri.sock"];
            args.extend_from_slice(extra);
            agent_args(&args)
        };
        let config = guard(&["--registry-config-dir", &certs]).expect("valid");
        assert_eq!(
            config.image_guard.expect("guard").registry_config_dirs,
            vec![dir.path().to_path_buf()]
        );
        let host = dir.path().join("registry.example:5000");
        std::fs::create_dir(&host).expect("host dir");
        for (hosts_toml, want) in [
            ("server = ", "not valid TOML"),
            (
                "[host.\"https://m\"]\ncapabilities = [\"fly\"]",
                "unknown capability",
            ),
            (
                "server = \"https://r\"\nca = \"missing.pem\"",
                "missing.pem",
            ),
        ] {
            std::fs::write(host.join("hosts.toml"), hosts_toml).expect("write");
            let err = guard(&["--registry-config-dir", &certs]).expect_err(hosts_toml);
            assert_eq!(err.flags(), ["--registry-config-dir"]);
            let line = err.to_string();
            assert!(
                line.starts_with("--registry-config-dir (CREDLET_REGISTRY_CONFIG_DIR): ")
                    && line.contains(want)
                    && !line.contains('\n'),
                "{line}"
            );
        }
        std::fs::write(
            host.join("hosts.toml"),
            "server = \"https://r\"\n[host.\"http://m:5000\"]\n",
        )
        .expect("write");
        guard(&["--registry-config-dir", &certs]).expect("valid again");
        for (value, want) in [
            ("relative/certs.d", "must be an absolute path"),
            ("/nonexistent/credlet/certs.d", "is not a directory"),
        ] {
            let err = guard(&["--registry-config-dir", value]).expect_err(value);
            assert!(err.to_string().contains(want), "{err}");
        }
    }

    #[test]
    fn deprecated_flags_still_work_and_exclude_their_successors() {
        let trust = trust_file();
        let trust_path = trust.path().to_string_lossy().into_owned();
        let config = agent_args(&[
            "--ca-trust",
            &trust_path,
            "--ca-timeout-ms",
            "2500",
            "--backoff-base-ms",
            "500",
            "--backoff-cap-ms",
            "60000",
            "--dev-ca-min-duration-s",
            "2",
        ])
        .expect("valid");
        assert_eq!(
            config.remote_ca.expect("remote").timeout,
            Duration::from_millis(2500)
        );
        assert_eq!(config.backoff_base, Duration::from_millis(500));
        assert_eq!(config.backoff_cap, Duration::from_secs(60));
        assert_eq!(config.dev_ca_min_duration, Duration::from_secs(2));
        assert_eq!(
            ca_args(&["--drain-timeout-s", "7"])
                .expect("valid")
                .drain_timeout,
            Duration::from_secs(7)
        );
        let both = Cli::try_parse_from([
            "credlet",
            "agent",
            "--node-id",
            "n",
            "--ca-timeout",
            "5s",
            "--ca-timeout-ms",
            "5000",
        ])
        .expect_err("both");
        assert_eq!(both.kind(), clap::error::ErrorKind::ArgumentConflict);
    }
}
