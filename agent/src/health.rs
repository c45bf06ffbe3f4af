//! A small HTTP/1.1 server for probes and scraping:
//!
//! - `GET /metrics`: the Prometheus registry (OpenMetrics text);
//! - `GET /healthz`: 200 while the process serves at all;
//! - `GET /readyz`: 200 when every readiness check passes, else 503 with
//!   the failing checks, one per line; degraded parts that do not make the
//!   process unready follow as `name: degraded: why` lines.
//!
//! Each binary mode brings its own registry and checks (`credlet ca`: CA
//! key material healthy; the node agent can add its own). Connections are
//! bounded in number and lifetime.

use std::convert::Infallible;
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Connections served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 32;
/// Longest life of one connection (probes and scrapes are one request).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// One readiness check: `Ok(())` when ready, else why not.
pub type ReadinessCheck = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What the server answers from.
pub struct HealthState {
    registry: Registry,
    checks: Vec<(String, ReadinessCheck)>,
    degradations: Vec<(String, DegradationCheck)>,
}

/// A part that may be degraded without making the process unready (the
/// CA's signer while the CA serves agents): `Some(why)` when degraded.
pub type DegradationCheck = Box<dyn Fn() -> Option<String> + Send + Sync>;

impl std::fmt::Debug for HealthState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthState")
            .field(
                "checks",
                &self.checks.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl HealthState {
    /// Serves `registry` with no readiness checks yet.
    pub fn new(registry: Registry) -> Self {
        Self {
            registry,
            checks: Vec::new(),
            degradations: Vec::new(),
        }
    }

    /// Adds a readiness check named `name`.
    #[must_use]
    pub fn with_check(
        mut self,
        name: impl Into<String>,
        check: impl Fn() -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.checks.push((name.into(), Box::new(check)));
        self
    }

    /// Adds a part named `name` whose degradation `/readyz` reports
    /// without failing.
    #[must_use]
    pub fn with_degradation(
        mut self,
        name: impl Into<String>,
        check: impl Fn() -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.degradations.push((name.into(), Box::new(check)));
        self
    }

    /// The degraded parts as `name: degraded: reason`.
    pub fn degraded(&self) -> Vec<String> {
        self.degradations
            .iter()
            .filter_map(|(name, check)| check().map(|why| format!("{name}: degraded: {why}")))
            .collect()
    }

    /// The failing checks as `name: reason`, empty when ready.
    pub fn failing(&self) -> Vec<String> {
        self.checks
            .iter()
            .filter_map(|(name, check)| check().err().map(|why| format!("{name}: {why}")))
            .collect()
    }

    fn answer(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        let reply = |status: StatusCode, content_type: &str, body: String| {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            if let Ok(value) = content_type.parse() {
                response
                    .headers_mut()
                    .insert(hyper::header::CONTENT_TYPE, value);
            }
            response
        };
        const TEXT: &str = "text/plain; charset=utf-8";
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                TEXT,
                "method not allowed\n".into(),
            );
        }
        match request.uri().path() {
            "/metrics" => {
                let mut text = String::new();
                match prometheus_client::encoding::text::encode(&mut text, &self.registry) {
                    Ok(()) => reply(
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        text,
                    ),
                    Err(_) => reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        TEXT,
                        "encoding metrics failed\n".into(),
                    ),
                }
            }
            "/healthz" => reply(StatusCode::OK, TEXT, "ok\n".into()),
            "/readyz" => {
                let failing = self.failing();
                let degraded = self.degraded();
                let mut lines = if failing.is_empty() {
                    vec!["ok".to_owned()]
                } else {
                    failing.clone()
                };
                lines.extend(degraded);
                let status = if failing.is_empty() {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                reply(status, TEXT, lines.join("\n") + "\n")
            }
            _ => reply(StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
        }
    }
}

/// Binds `addr` (this server's, or `credlet ca`'s gRPC port). `[::]`, what
/// a bare `:port` means, takes IPv4 connections too; on a host without IPv6
/// it falls back to `0.0.0.0` with the same port.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Err(error) if addr.ip() == Ipv6Addr::UNSPECIFIED && no_ipv6(&error) => {
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, addr.port())).await
        }
        result => result,
    }
}

fn no_ipv6(error: &std::io::Error) -> bool {
    error.kind() == std::io::ErrorKind::AddrNotAvailable
        || error.raw_os_error() == Some(rustix::io::Errno::AFNOSUPPORT.raw_os_error())
}

/// Serves `state` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: Arc<HealthState>,
    shutdown: impl Future<Output = ()>,
) {
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => return,
            permit = Arc::clone(&limit).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let (stream, _) = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(error = %error, "health server: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let response = state.answer(&request);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut text = String::new();
        stream.read_to_string(&mut text).await.expect("read");
        let code = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status line");
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        (code, body)
    }

    #[tokio::test]
    async fn probes_and_metrics() {
        let mut registry = Registry::default();
        let counter: prometheus_client::metrics::counter::Counter = Default::default();
        registry.register("probe_test", "A test counter", counter.clone());
        counter.inc();
        let ready = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&ready);
        let state = HealthState::new(registry).with_check("keys", move || {
            if flag.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("CA key material does not load".into())
            }
        });
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, Arc::new(state), async move {
            let _ = stop_rx.await;
        }));
        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".into()));
        let (code, body) = get(addr, "/readyz").await;
        assert_eq!(code, 503);
        assert_eq!(body, "keys: CA key material does not load\n");
        ready.store(true, Ordering::SeqCst);
        assert_eq!(get(addr, "/readyz").await.0, 200);
        let (code, body) = get(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(body.contains("probe_test_total 1"), "{body}");
        assert_eq!(get(addr, "/nope").await.0, 404);
        let _ = stop_tx.send(());
        server.await.expect("server stops");
    }
}
