//! A minimal registry HTTP client for assertions in tests: manifest HEAD
//! with both OCI and Docker `Accept` types, Basic and Bearer flows.
//!
//! It is deliberately independent of the code under test (the image guard's
//! own registry client); one connection per request, HTTP/1.1 over rustls
//! (ring).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{HOST, HeaderMap, WWW_AUTHENTICATE};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::image::{DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST};
use crate::pki::rustls_client_config;
use crate::registry::Registry;
use crate::token::{parse_form, percent_encode};

/// The `Accept` header for manifest requests: OCI and Docker types (an OCI
/// manifest answers 404 to a Docker-only Accept on distribution 2.8).
pub fn manifest_accept() -> String {
    [
        OCI_MANIFEST,
        DOCKER_MANIFEST,
        OCI_INDEX,
        DOCKER_MANIFEST_LIST,
    ]
    .join(", ")
}

/// A raw HTTP answer.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

/// Outcome of [`RegistryClient::head_manifest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestCheck {
    /// Final status of the manifest HEAD.
    pub status: u16,
    /// `Docker-Content-Digest` of a successful answer.
    pub digest: Option<String>,
    /// The `WWW-Authenticate` of the first, unauthenticated answer.
    pub challenge: Option<String>,
    /// Status of the token request, for Bearer registries.
    pub token_status: Option<u16>,
    /// Number of HTTP requests made (registry + token endpoint).
    pub requests: u32,
}

/// Client for one registry (and its token endpoint, signed by the same CA).
#[derive(Clone)]
pub struct RegistryClient {
    addr: SocketAddr,
    tls: TlsConnector,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl RegistryClient {
    /// A client trusting `registry`'s CA.
    pub fn new(registry: &Registry) -> Result<Self> {
        Self::for_addr(registry.addr(), registry.ca_der())
    }

    /// A client for `addr` trusting only `ca_der`.
    pub fn for_addr(addr: SocketAddr, ca_der: &[u8]) -> Result<Self> {
        Ok(Self {
            addr,
            tls: TlsConnector::from(Arc::new(rustls_client_config(ca_der)?)),
        })
    }

    /// One request to `addr` (the registry or its token endpoint).
    pub async fn request(
        &self,
        addr: SocketAddr,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<HttpAnswer> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        let tls = self
            .tls
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await
            .with_context(|| format!("TLS to {addr}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        let conn = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(HOST, addr.to_string());
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = sender.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        drop(sender);
        conn.abort();
        Ok(HttpAnswer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }

    /// `HEAD /v2/<repo>/manifests/<reference>` with an optional
    /// `Authorization` header value, nothing else.
    pub async fn head_manifest_raw(
        &self,
        repo: &str,
        reference: &str,
        authorization: Option<&str>,
    ) -> Result<HttpAnswer> {
        let mut headers = vec![("accept", manifest_accept())];
        if let Some(a) = authorization {
            headers.push(("authorization", a.to_string()));
        }
        self.request(
            self.addr,
            Method::HEAD,
            &format!("/v2/{repo}/manifests/{reference}"),
            &headers,
            None,
        )
        .await
    }

    /// Checks whether `creds` (None: anonymous) may read the manifest, the
    /// way a registry client does: unauthenticated HEAD, then per the
    /// challenge either Basic, or a token from the realm (GET, with Basic if
    /// `creds`) and the HEAD again with `Bearer`.
    pub async fn head_manifest(
        &self,
        repo: &str,
        reference: &str,
        creds: Option<(&str, &str)>,
    ) -> Result<ManifestCheck> {
        let first = self.head_manifest_raw(repo, reference, None).await?;
        let mut check = ManifestCheck {
            status: first.status,
            digest: digest_header(&first.headers),
            challenge: first
                .headers
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            token_status: None,
            requests: 1,
        };
        if first.status != 401 {
            return Ok(check);
        }
        let challenge = check
            .challenge
            .clone()
            .ok_or_else(|| anyhow!("401 without WWW-Authenticate"))?;
        let (scheme, params) =
            parse_challenge(&challenge).ok_or_else(|| anyhow!("bad challenge {challenge:?}"))?;
        let authorization = if scheme.eq_ignore_ascii_case("basic") {
            let Some((u, p)) = creds else {
                return Ok(check);
            };
            basic(u, p)
        } else if scheme.eq_ignore_ascii_case("bearer") {
            let realm = params
                .get("realm")
                .ok_or_else(|| anyhow!("Bearer challenge without realm"))?;
            let scope = params
                .get("scope")
                .cloned()
                .unwrap_or_else(|| format!("repository:{repo}:pull"));
            let (status, token) = self
                .fetch_token(
                    realm,
                    params.get("service").map(String::as_str),
                    &[&scope],
                    creds,
                )
                .await?;
            check.requests += 1;
            check.token_status = Some(status);
            match token {
                Some(t) => format!("Bearer {t}"),
                None => return Ok(check),
            }
        } else {
            bail!("unknown auth scheme {scheme}");
        };
        let second = self
            .head_manifest_raw(repo, reference, Some(&authorization))
            .await?;
        check.requests += 1;
        check.status = second.status;
        check.digest = digest_header(&second.headers);
        Ok(check)
    }

    /// `GET <realm>?service=…&scope=…` with Basic `creds`; returns the
    /// status and, on 200, the token.
    pub async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scopes: &[&str],
        creds: Option<(&str, &str)>,
    ) -> Result<(u16, Option<String>)> {
        let rest = realm
            .strip_prefix("https://")
            .ok_or_else(|| anyhow!("realm {realm} is not https"))?;
        let (hostport, path) = rest
            .split_once('/')
            .map(|(h, p)| (h, format!("/{p}")))
            .unwrap_or((rest, "/".into()));
        let addr: SocketAddr = hostport
            .parse()
            .with_context(|| format!("realm host {hostport}"))?;
        let mut query: Vec<String> = Vec::new();
        if let Some(s) = service {
            query.push(format!("service={}", percent_encode(s)));
        }
        for s in scopes {
            query.push(format!("scope={}", percent_encode(s)));
        }
        let sep = if path.contains('?') { '&' } else { '?' };
        let target = format!("{path}{sep}{}", query.join("&"));
        let headers: Vec<(&str, String)> = creds
            .map(|(u, p)| vec![("authorization", basic(u, p))])
            .unwrap_or_default();
        let ans = self
            .request(addr, Method::GET, &target, &headers, None)
            .await?;
        if ans.status != 200 {
            return Ok((ans.status, None));
        }
        let v: serde_json::Value = serde_json::from_slice(&ans.body)?;
        let token = v
            .get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .ok_or_else(|| anyhow!("token answer without token"))?;
        Ok((200, Some(token.to_string())))
    }
}

fn basic(user: &str, pass: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{pass}")))
}

fn digest_header(h: &HeaderMap) -> Option<String> {
    h.get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Parses `Scheme k="v", k2=v2` (one challenge) into scheme and params.
pub fn parse_challenge(header: &str) -> Option<(String, BTreeMap<String, String>)> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = BTreeMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = chars
                .by_ref()
                .take_while(|c| *c != ',')
                .collect::<String>()
                .trim()
                .to_string();
        }
        params.insert(key.trim().to_ascii_lowercase(), value);
    }
    Some((scheme.to_string(), params))
}

/// Decodes a query string into pairs (re-export for tests of token flows).
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    parse_form(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://127.0.0.1:1/token",service="svc",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(s, "Bearer");
        assert_eq!(p["realm"], "https://127.0.0.1:1/token");
        assert_eq!(p["service"], "svc");
        assert_eq!(p["scope"], "repository:a/b:pull,push");
        let (s, p) = parse_challenge(r#"Basic realm="x""#).unwrap();
        assert_eq!((s.as_str(), p["realm"].as_str()), ("Basic", "x"));
    }
}
