//! A Docker registry token endpoint (the "token" auth flow of CNCF
//! distribution), served by the harness on its own thread.
//!
//! - `GET /token?service=…&scope=…` with optional `Authorization: Basic`;
//! - `POST /token` (OAuth2 password grant, form body), which containerd tries
//!   first when it has a password.
//!
//! Wrong credentials answer 401. Right (or no) credentials always answer 200
//! with a JWT (ES256, `x5c` header) whose `access` claim holds only what the
//! grants allow — possibly nothing: like real token servers, a 200 here does
//! not prove access; only the registry's answer with the token does.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use serde_json::json;

use crate::pki::Leaf;

/// The `service` the registry expects in token audiences.
pub const TOKEN_SERVICE: &str = "credlet-test-registry";
/// The token issuer the registry trusts.
pub const TOKEN_ISSUER: &str = "credlet-test-token-issuer";
/// Grant user meaning "anyone, including anonymous requests".
pub const ANYONE: &str = "*";

/// What one user (or [`ANYONE`]) may do on one repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// User name, or [`ANYONE`].
    pub user: String,
    /// Repository name without host, e.g. `team/app`.
    pub repository: String,
    /// Actions such as `pull`, `push`.
    pub actions: Vec<String>,
}

impl Grant {
    /// `Grant::new("alice", "team/app", &["pull", "push"])`.
    pub fn new(user: &str, repository: &str, actions: &[&str]) -> Self {
        Self {
            user: user.to_string(),
            repository: repository.to_string(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
        }
    }
}

/// One request the token endpoint answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// `GET` or `POST`.
    pub method: String,
    /// The user name presented (Basic header or OAuth form); `None` for
    /// anonymous requests. Whether it authenticated: see `status` (401 = no).
    pub user: Option<String>,
    /// HTTP status answered: 200, 401 (bad credentials) or 400.
    pub status: u16,
    /// Scopes requested, as sent (`repository:name:actions`).
    pub requested: Vec<String>,
    /// Granted access, as `repository:name:actions` strings.
    pub granted: Vec<String>,
}

struct State {
    users: BTreeMap<String, String>,
    /// Changeable while serving: a repository can turn private mid-test.
    grants: Mutex<Vec<Grant>>,
    key: EcdsaKeyPair,
    x5c: String,
    rng: SystemRandom,
    log: Mutex<Vec<TokenRequest>>,
}

/// The running token endpoint; stops on drop.
pub struct TokenServer {
    addr: SocketAddr,
    state: Arc<State>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for TokenServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl TokenServer {
    /// Starts the endpoint on 127.0.0.1:<free port> with TLS from `tls_leaf`,
    /// signing tokens with `signing_leaf`'s key.
    pub(crate) fn start(
        users: &[(&str, &str)],
        grants: &[Grant],
        tls_leaf: &Leaf,
        signing_leaf: &Leaf,
    ) -> Result<Self> {
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &signing_leaf.key_pkcs8_der,
            &rng,
        )
        .map_err(|e| anyhow::anyhow!("token signing key: {e}"))?;
        let state = Arc::new(State {
            users: users
                .iter()
                .map(|(u, p)| (u.to_string(), p.to_string()))
                .collect(),
            grants: Mutex::new(grants.to_vec()),
            key,
            x5c: STANDARD.encode(&signing_leaf.cert_der),
            rng,
            log: Mutex::new(Vec::new()),
        });
        let tls = Arc::new(tls_leaf.rustls_server_config()?);
        let listener = TcpListener::bind("127.0.0.1:0").context("bind token endpoint")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name("credlet-token-endpoint".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("token endpoint runtime");
                rt.block_on(serve(listener, tls, st, rx));
            })?;
        Ok(Self {
            addr,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// `https://127.0.0.1:<port>/token`.
    pub fn realm(&self) -> String {
        format!("https://{}/token", self.addr)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.state.log.lock().expect("token log").clone()
    }

    /// Replaces the grants: tokens issued from now on carry only what
    /// `grants` allow (tokens already issued keep theirs until they expire).
    pub fn set_grants(&self, grants: &[Grant]) {
        *self.state.grants.lock().expect("token grants") = grants.to_vec();
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<State>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, _) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
        };
        let acceptor = acceptor.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        "application/json".parse().expect("static header"),
    );
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            "Basic realm=\"credlet-test-token\""
                .parse()
                .expect("static header"),
        );
    }
    resp
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    reply(
        status,
        json!({ "errors": [{ "code": code, "message": message }] }),
    )
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/token" {
        return error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such endpoint");
    }
    let method = req.method().clone();
    let query = req.uri().query().unwrap_or("").to_string();
    let basic = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut params = parse_form(&query);
    let (creds, oauth) = match method {
        Method::GET => (basic.as_deref().map(parse_basic), false),
        Method::POST => {
            let Ok(body) = req.into_body().collect().await else {
                return error(StatusCode::BAD_REQUEST, "BAD_REQUEST", "unreadable body");
            };
            params.extend(parse_form(&String::from_utf8_lossy(&body.to_bytes())));
            match first(&params, "grant_type").as_deref() {
                Some("password") => {}
                Some(other) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "UNSUPPORTED",
                        &format!("unsupported grant_type {other}"),
                    );
                }
                None => return error(StatusCode::BAD_REQUEST, "BAD_REQUEST", "missing grant_type"),
            }
            let user = first(&params, "username").unwrap_or_default();
            let pass = first(&params, "password").unwrap_or_default();
            (Some(Some((user, pass))), true)
        }
        _ => return error(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", "GET or POST"),
    };
    let mut requested: Vec<String> = Vec::new();
    for (k, v) in &params {
        if k == "scope" {
            requested.extend(v.split(' ').filter(|s| !s.is_empty()).map(str::to_string));
        }
    }
    let mut record = TokenRequest {
        method: method.to_string(),
        user: None,
        status: 200,
        requested: requested.clone(),
        granted: Vec::new(),
    };
    if let Some(service) = first(&params, "service")
        && service != TOKEN_SERVICE
    {
        record.status = 400;
        state.log.lock().expect("token log").push(record);
        return error(StatusCode::BAD_REQUEST, "BAD_REQUEST", "unknown service");
    }
    // None: anonymous. Some(None): unparsable header. Some(Some(..)): user+pass.
    record.user = match &creds {
        Some(Some((u, _))) => Some(u.clone()),
        _ => None,
    };
    let user = match creds {
        None => None,
        Some(Some((u, p))) if state.users.get(&u) == Some(&p) => Some(u),
        Some(_) => {
            record.status = 401;
            state.log.lock().expect("token log").push(record);
            return error(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "invalid username or password",
            );
        }
    };
    let access = grant(state, user.as_deref(), &requested);
    record.granted = access
        .iter()
        .map(|a| format!("repository:{}:{}", a.1, a.2.join(",")))
        .collect();
    let token = match sign_token(state, user.as_deref().unwrap_or(""), &access) {
        Ok(t) => t,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL",
                &e.to_string(),
            );
        }
    };
    state.log.lock().expect("token log").push(record);
    let body = if oauth {
        json!({ "access_token": token, "expires_in": 300, "scope": requested.join(" ") })
    } else {
        json!({ "token": token, "access_token": token, "expires_in": 300 })
    };
    reply(StatusCode::OK, body)
}

/// (type, name, actions) the user gets for the requested scopes.
fn grant(
    state: &State,
    user: Option<&str>,
    requested: &[String],
) -> Vec<(String, String, Vec<String>)> {
    let mut out = Vec::new();
    for scope in requested {
        // type:name:actions — the name may not contain ':' but be safe and
        // split the type off the front and the actions off the back.
        let Some((typ, rest)) = scope.split_once(':') else {
            continue;
        };
        let Some((name, actions)) = rest.rsplit_once(':') else {
            continue;
        };
        if typ != "repository" {
            continue;
        }
        let grants = state.grants.lock().expect("token grants");
        let allowed: Vec<&String> = grants
            .iter()
            .filter(|g| g.repository == name && (g.user == ANYONE || Some(g.user.as_str()) == user))
            .flat_map(|g| g.actions.iter())
            .collect();
        let actions: Vec<String> = actions
            .split(',')
            .filter(|a| {
                allowed
                    .iter()
                    .any(|g| g.as_str() == *a || g.as_str() == "*")
            })
            .map(str::to_string)
            .collect();
        if !actions.is_empty() {
            out.push((typ.to_string(), name.to_string(), actions));
        }
    }
    out
}

fn sign_token(
    state: &State,
    subject: &str,
    access: &[(String, String, Vec<String>)],
) -> Result<String> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let mut jti = [0u8; 12];
    ring::rand::SecureRandom::fill(&state.rng, &mut jti).map_err(|_| anyhow::anyhow!("rng"))?;
    let header = json!({ "typ": "JWT", "alg": "ES256", "x5c": [state.x5c] });
    let claims = json!({
        "iss": TOKEN_ISSUER,
        "sub": subject,
        "aud": TOKEN_SERVICE,
        "exp": now + 300,
        "nbf": now.saturating_sub(10),
        "iat": now,
        "jti": URL_SAFE_NO_PAD.encode(jti),
        "access": access.iter().map(|(t, n, a)| json!({ "type": t, "name": n, "actions": a })).collect::<Vec<_>>(),
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = state
        .key
        .sign(&state.rng, signing_input.as_bytes())
        .map_err(|_| anyhow::anyhow!("sign token"))?;
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(sig.as_ref())
    ))
}

/// `Basic <b64(user:pass)>` → Some((user, pass)); anything else → None.
fn parse_basic(header: &str) -> Option<(String, String)> {
    let (scheme, value) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = STANDARD.decode(value.trim()).ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let (u, p) = raw.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

fn first(params: &[(String, String)], key: &str) -> Option<String> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
}

/// `application/x-www-form-urlencoded` pairs (also used for query strings).
pub(crate) fn parse_form(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// Percent-encodes a query value (unreserved characters pass).
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_round_trip() {
        let v = "repository:team/app:pull,push";
        let parsed = parse_form(&format!(
            "scope={}&service=x+y&bad=%zz&end=%4",
            percent_encode(v)
        ));
        assert_eq!(parsed[0], ("scope".into(), v.into()));
        assert_eq!(parsed[1], ("service".into(), "x y".into()));
        assert_eq!(parsed[2], ("bad".into(), "%zz".into()));
        assert_eq!(parsed[3], ("end".into(), "%4".into()));
    }

    #[test]
    fn basic_header() {
        let h = format!("Basic {}", STANDARD.encode("alice:pa:ss"));
        assert_eq!(parse_basic(&h), Some(("alice".into(), "pa:ss".into())));
        assert_eq!(parse_basic("Bearer x"), None);
    }
}
