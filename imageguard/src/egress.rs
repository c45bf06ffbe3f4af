//! How registry requests leave the node: directly, or through the HTTP
//! proxy the container runtime uses.
//!
//! containerd's registry client is Go's `http.Transport` with
//! `Proxy: http.ProxyFromEnvironment`, so a node whose runtime reaches
//! registries through `HTTPS_PROXY` has no direct route to them: a guard
//! that connects directly could never verify anything there. [`ProxyEnv`]
//! reads the same variables and decides per request exactly as Go's
//! `golang.org/x/net/http/httpproxy` does ([`ProxyEnv::proxy_for`], a pure
//! function); [`EgressConnector`] carries it out: `CONNECT host:port` through
//! the proxy for `https` (TLS then runs end to end, the proxy sees only the
//! host name), and the absolute-form request line for plain `http`, as Go
//! sends them.
//!
//! Rules (Go's):
//! - `HTTPS_PROXY` serves `https` URLs, `HTTP_PROXY` plain `http` ones (the
//!   upper-case name wins when both are set and non-empty); `HTTP_PROXY` is
//!   ignored when `REQUEST_METHOD` is set (a CGI environment);
//! - a proxy without a scheme is `http://`; one without a port uses 80;
//!   `user:password@` becomes `Proxy-Authorization: Basic`;
//! - `localhost` and loopback addresses never go through a proxy;
//! - `NO_PROXY` (comma-separated, case-insensitive): `*` (nothing is
//!   proxied), an IP address or CIDR (`10.0.0.0/8`), a domain (`example.com`
//!   matches it and every subdomain; `.example.com` and `*.example.com` only
//!   subdomains), each optionally with `:port`.
//!
//! Only `http://` proxies are supported: an `https://` or `socks5://` proxy
//! is a configuration error at start, not a silent direct connection.

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use zeroize::Zeroizing;

/// The variables read, in the order Go reads them (the first non-empty of
/// each pair wins).
pub const PROXY_VARIABLES: [&str; 6] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "NO_PROXY",
    "no_proxy",
];

/// Longest answer header to a `CONNECT` read from a proxy.
const MAX_CONNECT_ANSWER: usize = 8 * 1024;

/// A proxy setting that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}={value}: {reason}")]
pub struct ProxyError {
    /// The environment variable.
    pub variable: &'static str,
    /// Its value, with any password replaced by `***`.
    pub value: String,
    /// What is wrong.
    pub reason: String,
}

/// An HTTP proxy: where to connect and how to authenticate.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    /// `host:port` of the proxy (port 80 when the variable named none).
    authority: String,
    /// `Proxy-Authorization` value, from the URL's user information.
    authorization: Option<Zeroizing<String>>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("authority", &self.authority)
            .field("authorization", &self.authorization.as_ref().map(|_| "***"))
            .finish()
    }
}

impl Proxy {
    /// Parses a proxy variable's value the way Go does: a value without
    /// `scheme://` is read as `http://value`.
    pub fn parse(value: &str) -> Result<Self, String> {
        let url = if value.contains("://") {
            value.to_string()
        } else {
            format!("http://{value}")
        };
        let uri: Uri = url.parse().map_err(|e| format!("not a proxy URL ({e})"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(format!(
                    "{other}:// proxies are not supported, only http:// (the connection to the \
                     registry is still TLS, tunnelled with CONNECT)"
                ));
            }
            None => return Err("not a proxy URL".to_string()),
        }
        let authority = uri.authority().ok_or("no proxy host")?.as_str();
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo), hostport),
            None => (None, authority),
        };
        let hostport: http::uri::Authority = hostport
            .parse()
            .map_err(|e| format!("invalid proxy host ({e})"))?;
        if hostport.host().is_empty() {
            return Err("no proxy host".to_string());
        }
        let authority = format!("{}:{}", hostport.host(), hostport.port_u16().unwrap_or(80));
        let authorization = userinfo.map(|info| {
            let (user, password) = info.split_once(':').unwrap_or((info, ""));
            let plain = Zeroizing::new(format!(
                "{}:{}",
                percent_decode(user).as_str(),
                percent_decode(password).as_str()
            ));
            Zeroizing::new(format!("Basic {}", STANDARD.encode(plain.as_bytes())))
        });
        Ok(Self {
            authority,
            authorization,
        })
    }

    /// `host:port` of the proxy.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// The `Proxy-Authorization` header value, if the URL carried a user.
    pub fn authorization(&self) -> Option<&str> {
        self.authorization.as_deref().map(String::as_str)
    }
}

/// One `NO_PROXY` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NoProxyRule {
    /// `*`.
    All,
    /// An IP network (`10.0.0.0/8`, `fd00::/8`).
    Cidr { network: IpAddr, prefix: u8 },
    /// An IP address, optionally with a port.
    Ip { ip: IpAddr, port: Option<String> },
    /// A domain: `host` begins with `.`; `exact` also matches the domain
    /// itself (written without a leading `.` or `*.`).
    Domain {
        host: String,
        exact: bool,
        port: Option<String>,
    },
}

/// The proxy environment of the agent, read once at start (Go caches it
/// for the process's lifetime too).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyEnv {
    http: Option<Proxy>,
    https: Option<Proxy>,
    no_proxy: Vec<NoProxyRule>,
}

impl ProxyEnv {
    /// No proxy at all.
    pub fn none() -> Self {
        Self::default()
    }

    /// Reads the process environment (see [`PROXY_VARIABLES`]).
    pub fn from_env() -> Result<Self, ProxyError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Builds the setting from `lookup` (a variable's value, `None` when
    /// unset): Go's `httpproxy.FromEnvironment` followed by its parsing.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ProxyError> {
        let any = |names: [&'static str; 2]| {
            names.into_iter().find_map(|name| {
                lookup(name)
                    .filter(|value| !value.is_empty())
                    .map(|value| (name, value))
            })
        };
        let proxy = |names: [&'static str; 2]| {
            any(names)
                .map(|(variable, value)| {
                    Proxy::parse(&value).map_err(|reason| ProxyError {
                        variable,
                        value: redact_userinfo(&value),
                        reason,
                    })
                })
                .transpose()
        };
        let https = proxy(["HTTPS_PROXY", "https_proxy"])?;
        let cgi = lookup("REQUEST_METHOD").is_some_and(|v| !v.is_empty());
        let http = if cgi {
            None
        } else {
            proxy(["HTTP_PROXY", "http_proxy"])?
        };
        let no_proxy = any(["NO_PROXY", "no_proxy"])
            .map(|(_, value)| parse_no_proxy(&value))
            .unwrap_or_default();
        Ok(Self {
            http,
            https,
            no_proxy,
        })
    }

    /// Whether any proxy is configured.
    pub fn is_empty(&self) -> bool {
        self.http.is_none() && self.https.is_none()
    }

    /// The proxy a request to `scheme://host:port` goes through (`None`:
    /// directly). `host` may be a bracketed IPv6 address.
    pub fn proxy_for(&self, scheme: &str, host: &str, port: u16) -> Option<&Proxy> {
        let proxy = match scheme {
            "https" => self.https.as_ref(),
            "http" => self.http.as_ref(),
            _ => None,
        }?;
        self.use_proxy(host, port).then_some(proxy)
    }

    /// Go's `useProxy`: loopback and `NO_PROXY` matches go directly.
    fn use_proxy(&self, host: &str, port: u16) -> bool {
        let host = host.trim().to_ascii_lowercase();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&host);
        if host.is_empty() {
            return true;
        }
        if host == "localhost" {
            return false;
        }
        let ip = host.parse::<IpAddr>().ok();
        if ip.is_some_and(|ip| ip.is_loopback()) {
            return false;
        }
        let port = port.to_string();
        let port_matches = |p: &Option<String>| p.as_ref().is_none_or(|p| *p == port);
        !self.no_proxy.iter().any(|rule| match rule {
            NoProxyRule::All => true,
            NoProxyRule::Cidr { network, prefix } => {
                ip.is_some_and(|ip| in_network(ip, *network, *prefix))
            }
            NoProxyRule::Ip {
                ip: rule_ip,
                port: p,
            } => ip.is_some_and(|ip| same_ip(ip, *rule_ip)) && port_matches(p),
            NoProxyRule::Domain {
                host: suffix,
                exact,
                port: p,
            } => {
                (host.ends_with(suffix.as_str()) || (*exact && host == &suffix[1..]))
                    && port_matches(p)
            }
        })
    }
}

/// Go's `config.init` for `NO_PROXY`: entries it cannot read are skipped.
fn parse_no_proxy(value: &str) -> Vec<NoProxyRule> {
    let mut rules = Vec::new();
    for entry in value.split(',') {
        let entry = entry.trim().to_ascii_lowercase();
        if entry.is_empty() {
            continue;
        }
        if entry == "*" {
            return vec![NoProxyRule::All];
        }
        if let Some((network, prefix)) = parse_cidr(&entry) {
            rules.push(NoProxyRule::Cidr { network, prefix });
            continue;
        }
        let (host, port) = match split_host_port(&entry) {
            Some((host, port)) => {
                if host.is_empty() {
                    continue;
                }
                let host = host
                    .strip_prefix('[')
                    .and_then(|h| h.strip_suffix(']'))
                    .unwrap_or(host);
                (host.to_string(), Some(port.to_string()))
            }
            None => (entry.clone(), None),
        };
        if let Ok(ip) = host.parse::<IpAddr>() {
            rules.push(NoProxyRule::Ip { ip, port });
            continue;
        }
        if host.is_empty() {
            continue;
        }
        let host = host
            .strip_prefix("*.")
            .map_or(host.clone(), |h| format!(".{h}"));
        let (host, exact) = if host.starts_with('.') {
            (host, false)
        } else {
            (format!(".{host}"), true)
        };
        rules.push(NoProxyRule::Domain { host, exact, port });
    }
    rules
}

/// Go's `net.SplitHostPort` for the shapes `NO_PROXY` entries take:
/// `host:port`, `[v6]:port`. `None` when there is no port part.
fn split_host_port(entry: &str) -> Option<(&str, &str)> {
    if entry.starts_with('[') {
        let end = entry.find(']')?;
        let port = entry[end + 1..].strip_prefix(':')?;
        return Some((&entry[..=end], port));
    }
    let (host, port) = entry.rsplit_once(':')?;
    // More than one ':' without brackets is an IPv6 address, not host:port.
    if host.contains(':') {
        return None;
    }
    Some((host, port))
}

/// `ip/prefix`.
fn parse_cidr(entry: &str) -> Option<(IpAddr, u8)> {
    let (ip, prefix) = entry.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    // Go's ParsePrefix: decimal digits without a leading zero.
    if prefix.is_empty()
        || (prefix.len() > 1 && prefix.starts_with('0'))
        || !prefix.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let prefix: u8 = prefix.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some((ip, prefix))
}

/// Go compares an IPv4 address and its IPv4-in-IPv6 form as equal.
fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    canonical(a) == canonical(b)
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn in_network(ip: IpAddr, network: IpAddr, prefix: u8) -> bool {
    match (canonical(ip), network) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

/// `%XX` decoding of URL user information (invalid escapes kept as is).
fn percent_decode(s: &str) -> Zeroizing<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Zeroizing::new(String::from_utf8_lossy(&out).into_owned())
}

/// A proxy URL for messages: the password replaced by `***`.
pub fn redact_userinfo(value: &str) -> String {
    let (prefix, rest) = match value.find("://") {
        Some(i) => value.split_at(i + 3),
        None => ("", value),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{prefix}{user}:***@{host}{}", &rest[end..])
        }
        None => value.to_string(),
    }
}

/// Connects to registries directly or through the proxy [`ProxyEnv`]
/// names, as the `tower` service hyper's client (under the TLS layer)
/// calls per new connection.
#[derive(Clone)]
pub struct EgressConnector {
    tcp: HttpConnector,
    proxies: Arc<ProxyEnv>,
}

impl fmt::Debug for EgressConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EgressConnector")
            .field("proxies", &self.proxies)
            .finish_non_exhaustive()
    }
}

impl EgressConnector {
    /// `tcp` makes every TCP connection (to a registry or to a proxy).
    pub fn new(tcp: HttpConnector, proxies: Arc<ProxyEnv>) -> Self {
        Self { tcp, proxies }
    }
}

/// A connection made by [`EgressConnector`]: TCP to the registry, a tunnel
/// through a proxy, or TCP to a proxy that forwards plain-HTTP requests.
#[derive(Debug)]
pub struct EgressStream {
    io: TokioIo<TcpStream>,
    /// Plain HTTP through a forwarding proxy: requests carry absolute URLs.
    forwarding: bool,
}

impl Connection for EgressStream {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.forwarding)
    }
}

impl hyper::rt::Read for EgressStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        hyper::rt::Read::poll_read(Pin::new(&mut self.io), cx, buf)
    }
}

impl hyper::rt::Write for EgressStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        hyper::rt::Write::poll_write(Pin::new(&mut self.io), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        hyper::rt::Write::poll_flush(Pin::new(&mut self.io), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        hyper::rt::Write::poll_shutdown(Pin::new(&mut self.io), cx)
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for EgressConnector {
    type Response = EgressStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<EgressStream, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, target: Uri) -> Self::Future {
        let mut tcp = self.tcp.clone();
        let proxies = Arc::clone(&self.proxies);
        Box::pin(async move {
            let scheme = target.scheme_str().unwrap_or("http").to_string();
            let host = target.host().ok_or("the URL has no host")?.to_string();
            let port = target
                .port_u16()
                .unwrap_or(if scheme == "https" { 443 } else { 80 });
            let Some(proxy) = proxies.proxy_for(&scheme, &host, port) else {
                let io = tcp.call(target).await?;
                return Ok(EgressStream {
                    io,
                    forwarding: false,
                });
            };
            let proxy_uri: Uri = format!("http://{}/", proxy.authority()).parse()?;
            let io = tcp
                .call(proxy_uri)
                .await
                .map_err(|e| -> BoxError { format!("proxy {}: {e}", proxy.authority()).into() })?;
            if scheme != "https" {
                return Ok(EgressStream {
                    io,
                    forwarding: true,
                });
            }
            let mut stream = io.into_inner();
            connect_tunnel(&mut stream, proxy, &format!("{host}:{port}")).await?;
            Ok(EgressStream {
                io: TokioIo::new(stream),
                forwarding: false,
            })
        })
    }
}

/// Asks the proxy for a tunnel to `target` (`host:port`) and reads its
/// answer; the stream then carries the TLS connection to the registry.
async fn connect_tunnel(
    stream: &mut TcpStream,
    proxy: &Proxy,
    target: &str,
) -> Result<(), BoxError> {
    let mut request = Zeroizing::new(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"));
    if let Some(authorization) = proxy.authorization() {
        request.push_str("Proxy-Authorization: ");
        request.push_str(authorization);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    // Byte by byte up to the blank line: nothing of the tunnel's own
    // traffic may be consumed here (the proxy sends none before the TLS
    // client speaks, but a buffered read would swallow it if it did).
    let mut answer = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        if answer.len() >= MAX_CONNECT_ANSWER {
            return Err(format!(
                "proxy {} sent more than {MAX_CONNECT_ANSWER} bytes of headers to CONNECT {target}",
                proxy.authority()
            )
            .into());
        }
        if stream.read(&mut byte).await? == 0 {
            return Err(format!(
                "proxy {} closed the connection during CONNECT {target}",
                proxy.authority()
            )
            .into());
        }
        answer.push(byte[0]);
    }
    let status_line = answer
        .split(|b| *b == b'\n')
        .next()
        .map(|l| String::from_utf8_lossy(l).trim().to_string())
        .unwrap_or_default();
    match connect_status(&status_line) {
        Some(status) if (200..300).contains(&status) => Ok(()),
        _ => Err(format!(
            "proxy {} refused CONNECT {target}: {}",
            proxy.authority(),
            status_line.chars().take(200).collect::<String>()
        )
        .into()),
    }
}

/// The status code of an `HTTP/1.x NNN reason` line.
fn connect_status(line: &str) -> Option<u16> {
    let mut parts = line.split_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<ProxyEnv, ProxyError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ProxyEnv::from_lookup(move |name| {
            vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
    }

    /// Which proxy (authority) a request takes, `None` for direct.
    fn via(env: &ProxyEnv, url: &str) -> Option<String> {
        let uri: Uri = url.parse().unwrap();
        let scheme = uri.scheme_str().unwrap();
        let port = uri
            .port_u16()
            .unwrap_or(if scheme == "https" { 443 } else { 80 });
        env.proxy_for(scheme, uri.host().unwrap(), port)
            .map(|p| p.authority().to_string())
    }

    /// Environment, request URL, the proxy it goes through.
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, Option<&'a str>);

    #[test]
    fn proxy_decisions() {
        // (environment, request URL, proxy used) — the cases of Go's
        // httpproxy tests that apply to registry requests.
        let p = "proxy.corp:3128";
        let cases: &[Case<'_>] = &[
            (&[], "https://registry.example/v2/", None),
            (
                &[("HTTPS_PROXY", p)],
                "https://registry.example/v2/",
                Some(p),
            ),
            // HTTPS_PROXY serves https only, HTTP_PROXY http only.
            (&[("HTTPS_PROXY", p)], "http://registry.example/v2/", None),
            (&[("HTTP_PROXY", p)], "https://registry.example/v2/", None),
            (&[("HTTP_PROXY", p)], "http://registry.example/v2/", Some(p)),
            // Lower case names; upper case wins.
            (&[("https_proxy", p)], "https://r.example/", Some(p)),
            (
                &[("HTTPS_PROXY", p), ("https_proxy", "other:1")],
                "https://r.example/",
                Some(p),
            ),
            // An empty upper-case value falls through to the lower-case one.
            (
                &[("HTTPS_PROXY", ""), ("https_proxy", "other:1")],
                "https://r.example/",
                Some("other:1"),
            ),
            // CGI: HTTP_PROXY ignored, HTTPS_PROXY kept.
            (
                &[("HTTP_PROXY", p), ("REQUEST_METHOD", "GET")],
                "http://r.example/",
                None,
            ),
            (
                &[("HTTPS_PROXY", p), ("REQUEST_METHOD", "GET")],
                "https://r.example/",
                Some(p),
            ),
            // Loopback and localhost always go directly.
            (&[("HTTPS_PROXY", p)], "https://localhost:5000/", None),
            (&[("HTTPS_PROXY", p)], "https://LOCALHOST:5000/", None),
            (&[("HTTPS_PROXY", p)], "https://127.0.0.1:5000/", None),
            (&[("HTTPS_PROXY", p)], "https://127.3.4.5/", None),
            (&[("HTTPS_PROXY", p)], "https://[::1]:5000/", None),
            // NO_PROXY: everything.
            (
                &[("HTTPS_PROXY", p), ("NO_PROXY", "*")],
                "https://r.example/",
                None,
            ),
            (
                &[("HTTPS_PROXY", p), ("NO_PROXY", "a.example, *")],
                "https://r.example/",
                None,
            ),
            // Domains: the domain and its subdomains, not lookalikes.
            (
                &[("HTTPS_PROXY", p), ("NO_PROXY", "example.com")],
                "https://example.com/",
                None,
            ),
            (
                &[("HTTPS_PROXY", p), ("NO_PROXY", "example.com")],
                "https://r.example.com/",
                None,
            ),
            (
                &[("HTTPS_PROXY", p), ("NO_PROXY", "example.com")],
                "https://badexample.com/",
                Some(p),
            ),
            (
                &[("HTTPS_PROXY", p), ("NO_PROXY", "EXAMPLE.com")],
                "https://r.Example.COM/",
                None,
            ),
            // A leading '.' or '*.' matches subdomains only.
            (
                &[("HTTPS_PROXY", p), ("NO_PROXY", ".example.com")],
                "https://example.com/",
                Some(p),
            ),
            (
                &[("HTTPS_PROXY", p), ("NO_PROXY", ".example.com")],
                "https://r.example.com/",
                None,
            ),
            (
                &[("HTTPS_PROXY", p), ("NO_PROXY", "*.example.com")],
                "https://example.com/",
                Some(p),
            ),
            (
                &[("HTTPS_PROXY", p), ("NO_PROXY", "*.example.com")],
                "https://a.b.example.com/",
                None,
            ),
            // Ports: an entry with a port matches only that port (443 is
            // the https default).
            (
                &[("HTTPS_PROXY", p), ("NO_PROXY", "example.com:5000")],
                "https://example.com:5000/",
                None,
            ),
            (
                &[("HTTPS_PROXY", p), ("NO_PROXY", "example.com:5000")],
                "https://example.com/",
                Some(p),
            ),
            (
                &[("HTTPS_PROXY", p), ("NO_PROXY", "example.com:443")],
                "https://example.com/",
                None,
            ),
            // IP addresses and networks.
            (
                &[("HTTPS_PROXY", p), ("NO_PROXY", "10.1.2.3")],
                "https://10.1.2.3:5000/",
                None,
            ),
            (
                &[("HTTPS_PROXY", p), ("NO_PROXY", "10.1.2.3")],
                "https://10.1.2.4/",
                Some(p),
            ),
            (
                &[("HTTPS_PROXY", p), ("NO_PROXY", "10.1.2.3:5000")],
                "https://10.1.2.3:5001/",
                Some(p),
            ),
            (
                &[("HTTPS_PROXY", p), ("NO_PROXY", "10.0.0.0/8")],
                "https://10.200.0.1/",
                None,
            ),
            (
                &[("HTTPS_PROXY", p), ("NO_PROXY", "10.0.0.0/8")],
                "https://11.0.0.1/",
                Some(p),
            ),
            (
                &[("HTTPS_PROXY", p), ("NO_PROXY", "fd00::/8")],
                "https://[fd12::1]/",
                None,
            ),
            (
                &[("HTTPS_PROXY", p), ("NO_PROXY", "[fd00::1]:5000")],
                "https://[fd00::1]:5000/",
                None,
            ),
            (
                &[("HTTPS_PROXY", p), ("NO_PROXY", "fd00::1")],
                "https://[fd00::1]:5000/",
                None,
            ),
            // A network never matches a name, a name never an address.
            (
                &[("HTTPS_PROXY", p), ("NO_PROXY", "10.0.0.0/8")],
                "https://r.example/",
                Some(p),
            ),
            // Unreadable entries are skipped.
            (
                &[("HTTPS_PROXY", p), ("NO_PROXY", ":5000, ,")],
                "https://r.example/",
                Some(p),
            ),
            (
                &[("HTTPS_PROXY", p), ("no_proxy", "r.example")],
                "https://r.example/",
                None,
            ),
            // Defaults: no scheme is http://, no port is 80.
            (
                &[("HTTPS_PROXY", "http://proxy.corp")],
                "https://r.example/",
                Some("proxy.corp:80"),
            ),
            (
                &[("HTTPS_PROXY", "proxy.corp")],
                "https://r.example/",
                Some("proxy.corp:80"),
            ),
        ];
        for (vars, url, want) in cases {
            let env = env(vars).unwrap();
            assert_eq!(via(&env, url).as_deref(), *want, "{vars:?} {url}");
        }
    }

    #[test]
    fn proxy_urls() {
        let e = env(&[("HTTPS_PROXY", "http://user:p%40ss@proxy.corp:3128")]).unwrap();
        let proxy = e.proxy_for("https", "r.example", 443).unwrap();
        assert_eq!(proxy.authority(), "proxy.corp:3128");
        assert_eq!(
            proxy.authorization(),
            Some(format!("Basic {}", STANDARD.encode("user:p@ss")).as_str())
        );
        assert!(!format!("{e:?}").contains("p@ss"));
        assert!(!format!("{e:?}").contains("p%40ss"));

        for (value, want) in [
            (
                "https://proxy.corp:443",
                "https:// proxies are not supported",
            ),
            (
                "socks5://proxy.corp:1080",
                "socks5:// proxies are not supported",
            ),
            ("http://", "not a proxy URL"),
            ("http://user:secret@", "not a proxy URL"),
        ] {
            let err = env(&[("HTTPS_PROXY", value)]).unwrap_err();
            assert_eq!(err.variable, "HTTPS_PROXY");
            assert!(err.to_string().contains(want), "{value}: {err}");
            assert!(!err.to_string().contains("secret"), "{err}");
        }
        let err = env(&[("http_proxy", "ftp://x")]).unwrap_err();
        assert_eq!(err.variable, "http_proxy");
        assert!(env(&[]).unwrap().is_empty());
        assert!(!env(&[("HTTP_PROXY", "p:1")]).unwrap().is_empty());
    }

    #[test]
    fn redaction_and_helpers() {
        for (value, want) in [
            ("http://u:pw@h:1", "http://u:***@h:1"),
            ("u:pw@h:1/x", "u:***@h:1/x"),
            ("http://h:1", "http://h:1"),
            ("http://u@h", "http://u:***@h"),
        ] {
            assert_eq!(redact_userinfo(value), want);
        }
        assert_eq!(
            connect_status("HTTP/1.1 200 Connection established"),
            Some(200)
        );
        assert_eq!(
            connect_status("HTTP/1.0 407 Proxy Authentication Required"),
            Some(407)
        );
        assert_eq!(connect_status("SSH-2.0-OpenSSH"), None);
        assert_eq!(percent_decode("a%41%zz%4").as_str(), "aA%zz%4");
        assert_eq!(split_host_port("[::1]:80"), Some(("[::1]", "80")));
        assert_eq!(split_host_port("::1"), None);
        assert_eq!(split_host_port("h:80"), Some(("h", "80")));
        assert_eq!(parse_cidr("10.0.0.0/33"), None);
        assert!(in_network(
            "::ffff:10.1.1.1".parse().unwrap(),
            "10.0.0.0".parse().unwrap(),
            8
        ));
        assert!(in_network(
            "1.2.3.4".parse().unwrap(),
            "0.0.0.0".parse().unwrap(),
            0
        ));
    }
}
