//! The container runtime's registry hosts: containerd's `hosts.toml` files
//! below its `config_path` (`/etc/containerd/certs.d`), read as containerd
//! 2.x reads them, so a check asks the endpoints the pull it stands in for
//! would have asked, in the same order and with the same TLS settings.
//!
//! For a registry host `H` (`docker.io`, `127.0.0.1:5000`) containerd takes,
//! in the first root directory that has one, the first existing directory
//! of `<root>/<H with :port spelled _port_>`, `<root>/<H>`, `<root>/_default`
//! ([`host_dir_names`]). In it, `hosts.toml` lists mirrors
//! (`[host."https://mirror:5000"]`, tried in file order) and last the
//! `server` (the registry itself when unset); without a `hosts.toml` the
//! directory is read in Docker's certificate layout (`*.crt` roots,
//! `*.cert` + `*.key` client pairs) for the registry itself.
//!
//! Per host: `capabilities` (`pull`, `resolve`, `push`, `referrers`; all of
//! them when absent or empty), `ca` (a path or a list, relative to the
//! host's directory), `client` (a combined cert+key file, a list of them, or
//! a list of `[cert, key]` pairs), `skip_verify`, `header` (extra request
//! headers), `override_path` (the URL's path is the API root as written,
//! instead of `<path>/v2`) and `dial_timeout` (a Go duration). An `http://`
//! host is plain HTTP, except that one with TLS settings and a port other
//! than 80 is tried with HTTPS first and plain HTTP only when the server
//! answers in plain HTTP, as containerd's `NewHTTPFallback` does.
//!
//! Parsing ([`parse_hosts_toml`], [`cert_files_entry`]) and the endpoint list
//! ([`endpoints`]) are pure; [`HostsDirs`] does the file system reads.
//!
//! Differences from containerd, all of them on the side of asking less:
//! - a `hosts.toml` that does not parse is an error (containerd logs it and
//!   falls back to the certificate layout);
//! - hosts defined as inline tables rather than `[host."…"]` sections are
//!   tried in the order of the `host` table (containerd skips them);
//! - a loopback registry without a host directory is HTTPS with verified
//!   certificates (containerd skips verification there and falls back to
//!   plain HTTP): give it a `hosts.toml` with an `http://` host or a `ca`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};

/// Docker Hub's registry name in references.
const DOCKER_HUB: &str = "docker.io";
/// Where containerd sends Docker Hub requests by default.
const DOCKER_HUB_HOST: &str = "registry-1.docker.io";
/// The host directory containerd falls back to for any registry.
pub const DEFAULT_HOST_DIR: &str = "_default";
/// Largest `hosts.toml` read.
const MAX_FILE: u64 = 1024 * 1024;

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTP over TLS.
    Https,
}

impl Scheme {
    /// `"http"` or `"https"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

/// What a host may be used for (containerd's `HostCapabilities`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Capabilities(u8);

impl Capabilities {
    /// Fetch content by digest.
    pub const PULL: Self = Self(1);
    /// Resolve a name to a digest: a host containerd trusts to say what an
    /// image is.
    pub const RESOLVE: Self = Self(2);
    /// Push.
    pub const PUSH: Self = Self(4);
    /// The OCI referrers API.
    pub const REFERRERS: Self = Self(8);
    /// Everything: a host without `capabilities`.
    pub const ALL: Self = Self(15);

    /// Whether every capability of `other` is in `self`.
    pub fn has(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

/// A host's TLS files as written (paths made absolute).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TlsFiles {
    /// `ca`: roots trusted for this host on top of the usual ones (`None`:
    /// not set; `Some(empty)` still counts as set, as in containerd).
    pub ca: Option<Vec<PathBuf>>,
    /// `client`: certificate files, each with its key file (`None`: the key
    /// is in the certificate file).
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    /// `skip_verify`.
    pub skip_verify: Option<bool>,
}

impl TlsFiles {
    /// Whether the host sets anything about TLS (containerd's
    /// `explicitTLSFromHost`).
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || !self.client.is_empty() || self.skip_verify.is_some()
    }
}

/// A host's URL: scheme, `host[:port]` and the API root path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostUrl {
    /// The scheme written.
    pub scheme: Scheme,
    /// `host[:port]` as written.
    pub authority: String,
    /// The API root (`/v2`, or the path as written with `override_path`;
    /// empty for the root), without a trailing `/`.
    pub path: String,
}

/// One host of a `hosts.toml`: a mirror, or the `server` (always last).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEntry {
    /// `None`: a `server` that is not set, i.e. the registry's own default.
    pub url: Option<HostUrl>,
    /// What the host may do.
    pub capabilities: Capabilities,
    /// TLS files.
    pub tls: TlsFiles,
    /// Extra request headers (`header`), names as written.
    pub headers: Vec<(String, String)>,
    /// `dial_timeout`.
    pub dial_timeout: Option<Duration>,
}

impl HostEntry {
    /// The registry itself with containerd's defaults (no host directory).
    pub fn default_server() -> Self {
        Self {
            url: None,
            capabilities: Capabilities::ALL,
            tls: TlsFiles::default(),
            headers: Vec::new(),
            dial_timeout: None,
        }
    }
}

/// A `hosts.toml` (or one of its hosts) that cannot be read as containerd
/// reads it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct ParseError {
    /// What is wrong, naming the host section.
    pub reason: String,
}

fn invalid(section: &str, reason: impl std::fmt::Display) -> ParseError {
    ParseError {
        reason: format!("{section}: {reason}"),
    }
}

/// Parses a `hosts.toml` whose directory is `base_dir` (relative file names
/// are taken from there): the mirrors in file order, then the server.
/// Unknown keys are ignored, as containerd's decoder does.
pub fn parse_hosts_toml(text: &str, base_dir: &Path) -> Result<Vec<HostEntry>, ParseError> {
    let table: Table = text.parse().map_err(|e: toml::de::Error| ParseError {
        reason: format!("not valid TOML: {}", e.message()),
    })?;
    let mut entries = Vec::new();
    match table.get("host") {
        None => {}
        Some(Value::Table(hosts)) => {
            for (url, host) in hosts {
                let section = format!("[host.{url:?}]");
                let Value::Table(host) = host else {
                    return Err(invalid(&section, "must be a table"));
                };
                if url.is_empty() {
                    return Err(invalid(&section, "the host URL is empty"));
                }
                entries.push(parse_entry(&section, Some(url.as_str()), host, base_dir)?);
            }
        }
        Some(_) => return Err(invalid("host", "must be a table of hosts")),
    }
    let server = match table.get("server") {
        None => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err(invalid("server", "must be a string")),
    };
    entries.push(parse_entry("server", server, &table, base_dir)?);
    Ok(entries)
}

/// One host's settings (containerd's `parseHostConfig`).
fn parse_entry(
    section: &str,
    url: Option<&str>,
    table: &Table,
    base_dir: &Path,
) -> Result<HostEntry, ParseError> {
    let bad = |reason: String| invalid(section, reason);
    let bool_key = |key: &str| match table.get(key) {
        None => Ok(None),
        Some(Value::Boolean(b)) => Ok(Some(*b)),
        Some(_) => Err(bad(format!("{key} must be true or false"))),
    };
    let override_path = bool_key("override_path")?.unwrap_or(false);
    let url = url
        .map(|url| parse_url(url, override_path).map_err(bad))
        .transpose()?;

    let capabilities = match table.get("capabilities") {
        None => Capabilities::ALL,
        Some(Value::Array(list)) if list.is_empty() => Capabilities::ALL,
        Some(Value::Array(list)) => {
            let mut caps = Capabilities(0);
            for c in list {
                let Value::String(c) = c else {
                    return Err(bad("capabilities must be strings".into()));
                };
                caps.0 |= match c.to_ascii_lowercase().as_str() {
                    "pull" => Capabilities::PULL.0,
                    "resolve" => Capabilities::RESOLVE.0,
                    "push" => Capabilities::PUSH.0,
                    "referrers" => Capabilities::REFERRERS.0,
                    _ => return Err(bad(format!("unknown capability {c:?}"))),
                };
            }
            caps
        }
        Some(_) => return Err(bad("capabilities must be a list".into())),
    };

    let path = |p: &str| make_abs(p, base_dir);
    let ca = match table.get("ca") {
        None => None,
        Some(Value::String(p)) => Some(vec![path(p)]),
        Some(Value::Array(list)) => Some(
            list.iter()
                .map(|v| match v {
                    Value::String(p) => Ok(path(p)),
                    _ => Err(bad("ca must be a path or a list of paths".into())),
                })
                .collect::<Result<_, _>>()?,
        ),
        Some(_) => return Err(bad("ca must be a path or a list of paths".into())),
    };
    let client_shape = "client must be a path, a list of paths or a list of [cert, key] pairs";
    let client = match table.get("client") {
        None => Vec::new(),
        Some(Value::String(p)) => vec![(path(p), None)],
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| match v {
                Value::String(p) => Ok((path(p), None)),
                Value::Array(pair) => match pair.as_slice() {
                    [Value::String(cert), Value::String(key)] => Ok((path(cert), Some(path(key)))),
                    _ => Err(bad(format!("invalid pair in client ({client_shape})"))),
                },
                _ => Err(bad(client_shape.into())),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad(client_shape.into())),
    };
    let skip_verify = bool_key("skip_verify")?;

    let mut headers = Vec::new();
    match table.get("header") {
        None => {}
        Some(Value::Table(h)) => {
            for (name, value) in h {
                let values: Vec<&str> = match value {
                    Value::String(v) => vec![v.as_str()],
                    Value::Array(list) => list
                        .iter()
                        .map(|v| v.as_str().ok_or(()))
                        .collect::<Result<_, _>>()
                        .map_err(|()| bad(format!("header {name:?} must be strings")))?,
                    _ => return Err(bad(format!("header {name:?} must be a string or a list"))),
                };
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    return Err(bad(format!("{name:?} is not a valid header name")));
                }
                for v in values {
                    if http::HeaderValue::from_str(v).is_err() {
                        return Err(bad(format!("header {name:?} has an invalid value")));
                    }
                    headers.push((name.clone(), v.to_string()));
                }
            }
        }
        Some(_) => return Err(bad("header must be a table".into())),
    }
    let dial_timeout = match table.get("dial_timeout") {
        None => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => {
            Some(parse_go_duration(s).map_err(|e| bad(format!("dial_timeout {s:?}: {e}")))?)
        }
        Some(_) => return Err(bad("dial_timeout must be a duration string".into())),
    };
    Ok(HostEntry {
        url,
        capabilities,
        tls: TlsFiles {
            ca,
            client,
            skip_verify,
        },
        headers,
        dial_timeout,
    })
}

/// A host URL as containerd reads it: `https://` is prepended unless the
/// text starts with `http`; the path gets `/v2` appended unless it ends in
/// `/v2` or `override_path` is set.
fn parse_url(text: &str, override_path: bool) -> Result<HostUrl, String> {
    // containerd would prepend https:// to `ftp://m` and fail on the host
    // `ftp:` at the first request: refuse it here.
    if !text.starts_with("http")
        && let Some((scheme, _)) = text.split_once("://")
    {
        return Err(format!(
            "{text:?}: scheme {scheme:?} is neither http nor https"
        ));
    }
    let full = if text.starts_with("http") {
        text.to_string()
    } else {
        format!("https://{text}")
    };
    let (scheme, rest) = full
        .split_once("://")
        .ok_or_else(|| format!("{text:?} is not a URL"))?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "https" => Scheme::Https,
        "http" => Scheme::Http,
        other => {
            return Err(format!(
                "{text:?}: scheme {other:?} is neither http nor https"
            ));
        }
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.contains('@') {
        return Err(format!("{text:?}: user information is not allowed"));
    }
    let parsed: http::uri::Authority = authority
        .parse()
        .map_err(|_| format!("{text:?}: invalid host"))?;
    if parsed.host().is_empty() || authority.ends_with(':') {
        return Err(format!("{text:?}: invalid host"));
    }
    let path = path.split(['?', '#']).next().unwrap_or("");
    let mut path = clean_path(path);
    if !override_path && !path.ends_with("/v2") {
        path.push_str("/v2");
    }
    Ok(HostUrl {
        scheme,
        authority: authority.to_string(),
        path,
    })
}

/// Go's `path.Clean` for an absolute URL path, returned without a trailing
/// `/` (empty for the root).
fn clean_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.iter().map(|p| format!("/{p}")).collect()
}

fn make_abs(path: &str, base: &Path) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// Go's `time.ParseDuration` for non-negative values: `300ms`, `1.5s`,
/// `1m30s`, `0`.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let s = text.strip_prefix('+').unwrap_or(text);
    if s.starts_with('-') {
        return Err("negative durations are not allowed".into());
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(digits);
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return Err("expected a number".into());
        }
        let value: f64 = number.parse().map_err(|_| "expected a number")?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err("missing unit".into()),
            other => return Err(format!("unknown unit {other:?}")),
        };
        total += value * scale;
        rest = tail;
    }
    Duration::try_from_secs_f64(total).map_err(|e| e.to_string())
}

/// A host directory without `hosts.toml`, read in Docker's layout
/// (containerd's `loadCertFiles`): `entries` are the directory's
/// `(name, is_directory)` in name order. `*.crt` files are roots; each
/// `*.cert` is a client certificate with the `*.key` of the same stem when
/// there is one (else the key is in the certificate file).
pub fn cert_files_entry(dir: &Path, entries: &[(String, bool)]) -> HostEntry {
    let mut entry = HostEntry::default_server();
    for (name, is_dir) in entries {
        if *is_dir {
            continue;
        }
        if name.ends_with(".crt") {
            entry
                .tls
                .ca
                .get_or_insert_with(Vec::new)
                .push(dir.join(name));
        }
        if let Some(stem) = name.strip_suffix(".cert") {
            let key = format!("{stem}.key");
            let key = entries
                .iter()
                .any(|(n, _)| *n == key)
                .then(|| dir.join(&key));
            entry.tls.client.push((dir.join(name), key));
        }
    }
    entry
}

/// The directory names containerd tries for `registry`, in order
/// (`hostPaths`): `host_port_` for `host:port`, then the name as it is,
/// then `_default`.
pub fn host_dir_names(registry: &str) -> Vec<String> {
    let mut names = Vec::with_capacity(3);
    if let Some(i) = registry.rfind(':').filter(|i| *i > 0) {
        names.push(format!("{}_{}_", &registry[..i], &registry[i + 1..]));
    }
    names.push(registry.to_string());
    names.push(DEFAULT_HOST_DIR.to_string());
    names
}

/// Who an endpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A `[host."…"]` entry.
    Mirror,
    /// The `server` (or the registry itself).
    Server,
}

/// One place a check sends its manifest request to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The scheme requests use first.
    pub scheme: Scheme,
    /// Retry with plain HTTP when the server answers a TLS handshake in
    /// plain HTTP (an `http://` host with TLS settings, port not 80).
    pub http_fallback: bool,
    /// `host[:port]`.
    pub authority: String,
    /// API root path (`/v2`).
    pub path: String,
    /// What the host may do.
    pub capabilities: Capabilities,
    /// TLS files.
    pub tls: TlsFiles,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// Connect timeout.
    pub dial_timeout: Option<Duration>,
    /// Mirror or server.
    pub role: Role,
    /// `ns=<registry>` query parameter: containerd adds it for every host
    /// that is not the registry itself, so that a mirror serving several
    /// registries knows which one is meant.
    pub namespace: Option<String>,
}

impl Endpoint {
    /// `scheme://host[:port]`, for messages.
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme.as_str(), self.authority)
    }

    /// `mirror https://m:5000` / `server https://r`, for messages.
    pub fn describe(&self) -> String {
        let role = match self.role {
            Role::Mirror => "mirror",
            Role::Server => "server",
        };
        format!("{role} {}", self.base_url())
    }
}

/// The endpoints containerd's `ConfigureHosts` makes for `registry` from
/// its host directory's entries (`None`: no directory): the last entry
/// without a URL becomes the registry itself (`registry-1.docker.io` for
/// `docker.io`) over `default_scheme`, with every capability.
pub fn endpoints(
    registry: &str,
    entries: Option<Vec<HostEntry>>,
    default_scheme: Scheme,
) -> Vec<Endpoint> {
    let entries = entries.unwrap_or_else(|| vec![HostEntry::default_server()]);
    let last = entries.len().saturating_sub(1);
    entries
        .into_iter()
        .enumerate()
        .map(|(i, entry)| {
            let (url, capabilities) = match entry.url {
                Some(url) => (url, entry.capabilities),
                None => {
                    let url = if registry == DOCKER_HUB {
                        HostUrl {
                            scheme: Scheme::Https,
                            authority: DOCKER_HUB_HOST.to_string(),
                            path: "/v2".to_string(),
                        }
                    } else {
                        HostUrl {
                            scheme: default_scheme,
                            authority: registry.to_string(),
                            path: "/v2".to_string(),
                        }
                    };
                    (url, Capabilities::ALL)
                }
            };
            let http_fallback = url.scheme == Scheme::Http
                && entry.tls.is_set()
                && port_of(&url.authority) != Some("80");
            let is_registry = url.authority == registry
                || (registry == DOCKER_HUB && url.authority == DOCKER_HUB_HOST);
            Endpoint {
                scheme: if http_fallback {
                    Scheme::Https
                } else {
                    url.scheme
                },
                http_fallback,
                authority: url.authority,
                path: url.path,
                capabilities,
                tls: entry.tls,
                headers: entry.headers,
                dial_timeout: entry.dial_timeout,
                role: if i == last {
                    Role::Server
                } else {
                    Role::Mirror
                },
                namespace: (!is_registry).then(|| registry.to_string()),
            }
        })
        .collect()
}

/// The port of `host:port` / `[v6]:port`, as Go's `SplitHostPort` finds it.
fn port_of(authority: &str) -> Option<&str> {
    if authority.starts_with('[') {
        return authority.rsplit_once("]:").map(|(_, p)| p);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => Some(port),
        _ => None,
    }
}

/// A host directory that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    /// A file or directory could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A `hosts.toml` is not what containerd reads.
    #[error("{path}: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: ParseError,
    },
}

/// The runtime's registry configuration directories (containerd's
/// `config_path`, which may list several), read on every check as
/// containerd reads them on every pull: a change applies to the next check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostsDirs {
    roots: Vec<PathBuf>,
}

impl HostsDirs {
    /// The roots, in order.
    pub fn new(roots: Vec<PathBuf>) -> Self {
        Self { roots }
    }

    /// Whether no directory is configured.
    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    /// The roots.
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// `registry`'s host directory, if any root has one.
    pub fn host_dir(&self, registry: &str) -> Result<Option<PathBuf>, HostsError> {
        let names = host_dir_names(registry);
        for root in &self.roots {
            for name in &names {
                let dir = root.join(name);
                match std::fs::metadata(&dir) {
                    Ok(_) => return Ok(Some(dir)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => return Err(HostsError::Io { path: dir, source }),
                }
            }
        }
        Ok(None)
    }

    /// The entries of `registry`'s host directory (`None`: there is none).
    pub fn load(&self, registry: &str) -> Result<Option<Vec<HostEntry>>, HostsError> {
        match self.host_dir(registry)? {
            Some(dir) => load_host_dir(&dir).map(Some),
            None => Ok(None),
        }
    }

    /// Reads every host directory below every root and returns each with
    /// its entries: for checking the configuration at start.
    pub fn load_all(&self) -> Result<Vec<(PathBuf, Vec<HostEntry>)>, HostsError> {
        let mut all = Vec::new();
        for root in &self.roots {
            let read = std::fs::read_dir(root).map_err(|source| HostsError::Io {
                path: root.clone(),
                source,
            })?;
            let mut dirs = Vec::new();
            for item in read {
                let item = item.map_err(|source| HostsError::Io {
                    path: root.clone(),
                    source,
                })?;
                if item.path().is_dir() {
                    dirs.push(item.path());
                }
            }
            dirs.sort();
            for dir in dirs {
                let entries = load_host_dir(&dir)?;
                all.push((dir, entries));
            }
        }
        Ok(all)
    }
}

/// containerd's `loadHostDir`: `hosts.toml` if present and not empty, else
/// the certificate layout.
fn load_host_dir(dir: &Path) -> Result<Vec<HostEntry>, HostsError> {
    let file = dir.join("hosts.toml");
    let text = match read_limited(&file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => return Err(HostsError::Io { path: file, source }),
    };
    if text.is_empty() {
        let io = |source| HostsError::Io {
            path: dir.to_path_buf(),
            source,
        };
        let mut entries = Vec::new();
        for item in std::fs::read_dir(dir).map_err(io)? {
            let item = item.map_err(io)?;
            let is_dir = item.file_type().map_err(io)?.is_dir();
            entries.push((item.file_name().to_string_lossy().into_owned(), is_dir));
        }
        entries.sort();
        return Ok(vec![cert_files_entry(dir, &entries)]);
    }
    parse_hosts_toml(&text, dir).map_err(|source| HostsError::Invalid { path: file, source })
}

fn read_limited(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_FILE + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_FILE {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_FILE} bytes"
        )));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> PathBuf {
        PathBuf::from("/etc/containerd/certs.d/r.example")
    }

    fn url(scheme: Scheme, authority: &str, path: &str) -> Option<HostUrl> {
        Some(HostUrl {
            scheme,
            authority: authority.into(),
            path: path.into(),
        })
    }

    fn entry(url: Option<HostUrl>) -> HostEntry {
        HostEntry {
            url,
            ..HostEntry::default_server()
        }
    }

    #[test]
    fn parses_hosts_files() {
        use Scheme::*;
        let b = base();
        let cases: Vec<(&str, Vec<HostEntry>)> = vec![
            // Only a server.
            (
                r#"server = "https://r.example""#,
                vec![entry(url(Https, "r.example", "/v2"))],
            ),
            // No server: the last entry is the registry's default.
            ("", vec![entry(None)]),
            (r#"server = """#, vec![entry(None)]),
            // Mirrors in file order (not sorted), then the server.
            (
                r#"
server = "https://r.example"
[host."https://z-mirror:5000"]
  capabilities = ["pull", "resolve"]
[host."http://a-mirror"]
  capabilities = ["pull"]
"#,
                vec![
                    HostEntry {
                        capabilities: Capabilities(Capabilities::PULL.0 | Capabilities::RESOLVE.0),
                        ..entry(url(Https, "z-mirror:5000", "/v2"))
                    },
                    HostEntry {
                        capabilities: Capabilities::PULL,
                        ..entry(url(Http, "a-mirror", "/v2"))
                    },
                    entry(url(Https, "r.example", "/v2")),
                ],
            ),
            // A host without a scheme is https; a path gets /v2 unless it
            // has it or override_path says it is the API root.
            (
                r#"
[host."mirror.example/cache"]
[host."https://m2/v2"]
[host."https://m3/api/x/"]
  override_path = true
[host."https://m4/a/../b/./"]
"#,
                vec![
                    entry(url(Https, "mirror.example", "/cache/v2")),
                    entry(url(Https, "m2", "/v2")),
                    entry(url(Https, "m3", "/api/x")),
                    entry(url(Https, "m4", "/b/v2")),
                    entry(None),
                ],
            ),
            // TLS files: relative to the host directory; every client shape.
            (
                r#"
server = "https://r.example"
ca = "ca.crt"
skip_verify = false
client = [["/abs/c.pem", "k.pem"], "both.pem"]
[host."https://m"]
  ca = ["/etc/a.pem", "b.pem"]
  client = "combined.pem"
  skip_verify = true
  dial_timeout = "1.5s"
  [host."https://m".header]
    x-mirror-token = "t"
    x-multi = ["1", "2"]
"#,
                vec![
                    HostEntry {
                        tls: TlsFiles {
                            ca: Some(vec!["/etc/a.pem".into(), b.join("b.pem")]),
                            client: vec![(b.join("combined.pem"), None)],
                            skip_verify: Some(true),
                        },
                        headers: vec![
                            ("x-mirror-token".into(), "t".into()),
                            ("x-multi".into(), "1".into()),
                            ("x-multi".into(), "2".into()),
                        ],
                        dial_timeout: Some(Duration::from_millis(1500)),
                        ..entry(url(Https, "m", "/v2"))
                    },
                    HostEntry {
                        tls: TlsFiles {
                            ca: Some(vec![b.join("ca.crt")]),
                            client: vec![
                                ("/abs/c.pem".into(), Some(b.join("k.pem"))),
                                (b.join("both.pem"), None),
                            ],
                            skip_verify: Some(false),
                        },
                        ..entry(url(Https, "r.example", "/v2"))
                    },
                ],
            ),
            // Capabilities: case-insensitive; an empty list means all;
            // server capabilities come from the top level.
            (
                r#"
server = "https://r.example"
capabilities = ["PULL"]
[host."https://m"]
  capabilities = []
"#,
                vec![
                    entry(url(Https, "m", "/v2")),
                    HostEntry {
                        capabilities: Capabilities::PULL,
                        ..entry(url(Https, "r.example", "/v2"))
                    },
                ],
            ),
            // Unknown keys are ignored.
            (
                "server = \"https://r\"\nmirrors = 3\n[host.\"https://m\"]\n  future = true\n",
                vec![entry(url(Https, "m", "/v2")), entry(url(Https, "r", "/v2"))],
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse_hosts_toml(text, &b).unwrap(), want, "{text}");
        }
    }

    #[test]
    fn rejects_what_containerd_cannot_read() {
        for (text, want) in [
            ("server = ", "not valid TOML"),
            ("server = 3", "server: must be a string"),
            ("host = 3", "must be a table of hosts"),
            ("[host]\n\"https://m\" = 3", "must be a table"),
            (
                "[host.\"https://m\"]\ncapabilities = [\"fly\"]",
                "unknown capability",
            ),
            (
                "[host.\"https://m\"]\ncapabilities = \"pull\"",
                "must be a list",
            ),
            (
                "[host.\"https://m\"]\ncapabilities = [1]",
                "must be strings",
            ),
            ("[host.\"https://m\"]\nca = 1", "ca must be"),
            ("[host.\"https://m\"]\nca = [1]", "ca must be"),
            ("[host.\"https://m\"]\nclient = [[\"a\"]]", "invalid pair"),
            (
                "[host.\"https://m\"]\nclient = [[\"a\", \"b\", \"c\"]]",
                "invalid pair",
            ),
            ("[host.\"https://m\"]\nclient = 1", "client must be"),
            (
                "[host.\"https://m\"]\nskip_verify = \"yes\"",
                "skip_verify must be",
            ),
            (
                "[host.\"https://m\"]\noverride_path = 1",
                "override_path must be",
            ),
            ("[host.\"https://m\"]\ndial_timeout = \"5\"", "missing unit"),
            ("[host.\"https://m\"]\ndial_timeout = 5", "duration string"),
            ("[host.\"https://m\"]\nheader = 1", "header must be a table"),
            (
                "[host.\"https://m\"]\nheader = { \"a b\" = \"x\" }",
                "not a valid header name",
            ),
            (
                "[host.\"https://m\"]\nheader = { x = \"a\\nb\" }",
                "invalid value",
            ),
            (
                "[host.\"https://m\"]\nheader = { x = 1 }",
                "must be a string or a list",
            ),
            ("[host.\"ftp://m\"]", "neither http nor https"),
            ("[host.\"https://u:p@m\"]", "user information"),
            ("[host.\"https://\"]", "invalid host"),
            ("[host.\"\"]", "empty"),
            ("server = \"https://bad host\"", "invalid host"),
        ] {
            let err = parse_hosts_toml(text, &base()).expect_err(text);
            assert!(err.to_string().contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn go_durations() {
        for (text, want) in [
            ("0", Some(Duration::ZERO)),
            ("5s", Some(Duration::from_secs(5))),
            ("300ms", Some(Duration::from_millis(300))),
            ("1.5s", Some(Duration::from_millis(1500))),
            ("1m30s", Some(Duration::from_secs(90))),
            ("2h", Some(Duration::from_secs(7200))),
            ("10us", Some(Duration::from_micros(10))),
            ("10µs", Some(Duration::from_micros(10))),
            ("+1s", Some(Duration::from_secs(1))),
            ("", None),
            ("5", None),
            ("-1s", None),
            ("1d", None),
            ("s", None),
            ("1..2s", None),
        ] {
            assert_eq!(parse_go_duration(text).ok(), want, "{text:?}");
        }
    }

    #[test]
    fn docker_certificate_layout() {
        let dir = Path::new("/certs.d/r.example:5000");
        let names = |list: &[(&str, bool)]| -> Vec<(String, bool)> {
            list.iter().map(|(n, d)| (n.to_string(), *d)).collect()
        };
        let e = cert_files_entry(
            dir,
            &names(&[
                ("ca.crt", false),
                ("client.cert", false),
                ("client.key", false),
                ("lonely.cert", false),
                ("other.crt", false),
                ("sub.crt", true),
                ("readme", false),
            ]),
        );
        assert_eq!(e.url, None);
        assert_eq!(
            e.tls.ca,
            Some(vec![dir.join("ca.crt"), dir.join("other.crt")])
        );
        assert_eq!(
            e.tls.client,
            vec![
                (dir.join("client.cert"), Some(dir.join("client.key"))),
                (dir.join("lonely.cert"), None)
            ]
        );
        let empty = cert_files_entry(dir, &[]);
        assert_eq!(empty, HostEntry::default_server());
        assert!(!empty.tls.is_set());
    }

    #[test]
    fn host_directories() {
        assert_eq!(
            host_dir_names("127.0.0.1:5000"),
            ["127.0.0.1_5000_", "127.0.0.1:5000", "_default"]
        );
        assert_eq!(host_dir_names("docker.io"), ["docker.io", "_default"]);
        assert_eq!(
            host_dir_names("[::1]:5000"),
            ["[::1]_5000_", "[::1]:5000", "_default"]
        );
    }

    #[test]
    fn endpoint_lists() {
        use Scheme::*;
        let hub = endpoints("docker.io", None, Https);
        assert_eq!(hub.len(), 1);
        assert_eq!(hub[0].base_url(), "https://registry-1.docker.io");
        assert_eq!(
            (hub[0].role, hub[0].namespace.as_deref()),
            (Role::Server, None)
        );
        assert_eq!(hub[0].path, "/v2");

        let plain = endpoints("r.example:5000", None, Http);
        assert_eq!(plain[0].base_url(), "http://r.example:5000");
        assert!(!plain[0].http_fallback);

        let b = base();
        let entries = parse_hosts_toml(
            r#"
server = "https://r.example"
[host."https://m1:5000"]
[host."http://m2:5000"]
[host."http://m3:5000"]
  skip_verify = true
[host."http://m4:80"]
  ca = "ca.pem"
[host."http://m5"]
  ca = "ca.pem"
"#,
            &b,
        )
        .unwrap();
        let list = endpoints("r.example", Some(entries), Https);
        let summary: Vec<(String, bool, Role, Option<&str>)> = list
            .iter()
            .map(|e| {
                (
                    e.base_url(),
                    e.http_fallback,
                    e.role,
                    e.namespace.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    "https://m1:5000".into(),
                    false,
                    Role::Mirror,
                    Some("r.example")
                ),
                (
                    "http://m2:5000".into(),
                    false,
                    Role::Mirror,
                    Some("r.example")
                ),
                // TLS settings on an http:// host: HTTPS first.
                (
                    "https://m3:5000".into(),
                    true,
                    Role::Mirror,
                    Some("r.example")
                ),
                // ... except on port 80.
                (
                    "http://m4:80".into(),
                    false,
                    Role::Mirror,
                    Some("r.example")
                ),
                ("https://m5".into(), true, Role::Mirror, Some("r.example")),
                ("https://r.example".into(), false, Role::Server, None),
            ]
        );
        // A mirror-only file for Docker Hub: the default server is
        // registry-1.docker.io, which gets no ns parameter.
        let entries = parse_hosts_toml("[host.\"https://m\"]\n", &b).unwrap();
        let list = endpoints("docker.io", Some(entries), Https);
        assert_eq!(list[0].namespace.as_deref(), Some("docker.io"));
        assert_eq!(list[1].base_url(), "https://registry-1.docker.io");
        assert_eq!(list[1].namespace, None);
        assert_eq!(list[1].capabilities, Capabilities::ALL);
        // A server elsewhere is asked with ns too.
        let entries = parse_hosts_toml("server = \"https://elsewhere\"", &b).unwrap();
        let list = endpoints("r.example", Some(entries), Https);
        assert_eq!(list[0].namespace.as_deref(), Some("r.example"));
        assert_eq!(port_of("[::1]:80"), Some("80"));
        assert_eq!(port_of("m"), None);
        assert_eq!(port_of("[::1]"), None);
    }

    #[test]
    fn reads_directories() {
        let root = tempfile::tempdir().unwrap();
        let dirs = HostsDirs::new(vec![root.path().to_path_buf()]);
        assert!(dirs.load("r.example").unwrap().is_none());

        std::fs::create_dir(root.path().join("_default")).unwrap();
        std::fs::write(root.path().join("_default/ca.crt"), "x").unwrap();
        let e = dirs.load("r.example").unwrap().unwrap();
        assert_eq!(e[0].tls.ca, Some(vec![root.path().join("_default/ca.crt")]));

        // host:port spelled host_port_ comes first, then host:port.
        for name in ["r.example:5000", "r.example_5000_"] {
            let d = root.path().join(name);
            std::fs::create_dir(&d).unwrap();
            std::fs::write(
                d.join("hosts.toml"),
                format!("server = \"https://{name}.server\""),
            )
            .unwrap();
        }
        let e = dirs.load("r.example:5000").unwrap().unwrap();
        assert_eq!(
            e[0].url.as_ref().unwrap().authority,
            "r.example_5000_.server"
        );
        std::fs::write(root.path().join("r.example_5000_/hosts.toml"), "server = ").unwrap();
        let err = dirs.load("r.example:5000").unwrap_err();
        assert!(matches!(err, HostsError::Invalid { .. }), "{err}");
        assert!(err.to_string().contains("hosts.toml"), "{err}");
        assert!(dirs.load_all().is_err());
        std::fs::remove_dir_all(root.path().join("r.example_5000_")).unwrap();
        let all = dirs.load_all().unwrap();
        assert_eq!(all.len(), 2);

        // A second root is asked only when the first has no directory.
        let second = tempfile::tempdir().unwrap();
        std::fs::create_dir(second.path().join("other.example")).unwrap();
        let two = HostsDirs::new(vec![second.path().to_path_buf(), root.path().to_path_buf()]);
        assert_eq!(
            two.host_dir("other.example").unwrap(),
            Some(second.path().join("other.example"))
        );
        // _default of the first root wins over a named directory of the
        // second, as in containerd.
        std::fs::create_dir(second.path().join("_default")).unwrap();
        assert_eq!(
            two.host_dir("r.example:5000").unwrap(),
            Some(second.path().join("_default"))
        );
    }
}
