//! The CRI proxy: an HTTP/2 server on the kubelet's side, a small pool of
//! long-lived HTTP/2 connections to the real runtime on the other.
//!
//! Every call passes through as frames — headers, data and trailers
//! untouched, streaming calls included — except the few RPCs an
//! [`Inspector`] decides on. Those bodies are buffered (bounded), handed to
//! the inspector as their original bytes, and either forwarded unchanged or
//! answered by credlet. If the runtime can not be reached the kubelet gets
//! `Unavailable`; nothing is ever allowed because something is missing.

use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, request, response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{UnixListener, UnixStream};

use crate::grpc::{self, Code, MAX_INSPECTED_MESSAGE, ProxyBody};

/// A boxed future, so inspectors can be trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// `ImageService/ImageStatus`.
pub const IMAGE_STATUS: &str = "/runtime.v1.ImageService/ImageStatus";
/// `ImageService/PullImage`.
pub const PULL_IMAGE: &str = "/runtime.v1.ImageService/PullImage";
/// `ImageService/ListImages`.
pub const LIST_IMAGES: &str = "/runtime.v1.ImageService/ListImages";
/// `RuntimeService/CreateContainer`.
pub const CREATE_CONTAINER: &str = "/runtime.v1.RuntimeService/CreateContainer";

/// The RPCs an inspector sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rpc {
    /// `ImageStatus`.
    ImageStatus,
    /// `PullImage`.
    PullImage,
    /// `CreateContainer`.
    CreateContainer,
}

impl Rpc {
    /// The RPC a request path names, if it is inspected.
    pub fn from_path(path: &str) -> Option<Self> {
        match path {
            IMAGE_STATUS => Some(Self::ImageStatus),
            PULL_IMAGE => Some(Self::PullImage),
            CREATE_CONTAINER => Some(Self::CreateContainer),
            _ => None,
        }
    }
}

/// An inspected unary call: the original request and its message.
#[derive(Debug)]
pub struct InspectedCall {
    /// Which RPC.
    pub rpc: Rpc,
    /// Request head, to forward unchanged.
    pub parts: request::Parts,
    /// The original framed body, to forward unchanged.
    pub body: Bytes,
    /// The message inside the frame, to decode read-only.
    pub message: Bytes,
}

/// Decides on inspected calls.
pub trait Inspector: Send + Sync + 'static {
    /// Answers an inspected call: usually by forwarding it through
    /// `upstream` and returning the runtime's answer, or by answering
    /// itself.
    fn inspect<'a>(
        &'a self,
        call: InspectedCall,
        upstream: &'a Upstream,
    ) -> BoxFuture<'a, Response<ProxyBody>>;
}

/// Forwards every call unchanged (no inspection): the baseline for
/// transparency tests and benchmarks.
#[derive(Debug, Default, Clone, Copy)]
pub struct PassThrough;

impl Inspector for PassThrough {
    fn inspect<'a>(
        &'a self,
        call: InspectedCall,
        upstream: &'a Upstream,
    ) -> BoxFuture<'a, Response<ProxyBody>> {
        Box::pin(async move {
            match upstream.forward_buffered(call.parts, call.body).await {
                Ok(buffered) => buffered.into_response(),
                Err(error) => error.to_response(),
            }
        })
    }
}

/// Why the runtime could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Connecting to the runtime's socket failed.
    #[error("container runtime at {socket:?} is unavailable: {source}")]
    Connect {
        /// The runtime socket.
        socket: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP/2 exchange failed.
    #[error("container runtime at {socket:?} failed the call: {source}")]
    Exchange {
        /// The runtime socket.
        socket: PathBuf,
        /// The error.
        #[source]
        source: hyper::Error,
    },
    /// The runtime did not answer in time.
    #[error("container runtime at {socket:?} did not answer within {after:?}")]
    Timeout {
        /// The runtime socket.
        socket: PathBuf,
        /// The deadline.
        after: Duration,
    },
    /// The runtime answered a call credlet made itself with an error.
    #[error("container runtime answered {path} with gRPC status {status}: {message}")]
    Status {
        /// The RPC.
        path: &'static str,
        /// The gRPC status code.
        status: u32,
        /// The runtime's message.
        message: String,
    },
    /// The runtime's answer did not decode.
    #[error("container runtime's answer to {path} is malformed: {reason}")]
    Malformed {
        /// The RPC.
        path: &'static str,
        /// Why.
        reason: String,
    },
}

impl UpstreamError {
    /// The kubelet-facing response for this failure: `Unavailable`.
    pub fn to_response(&self) -> Response<ProxyBody> {
        grpc::error_response(Code::Unavailable, &self.to_string())
    }
}

/// A runtime response read completely (for inspected calls).
#[derive(Debug)]
pub struct Buffered {
    /// Status line and headers.
    pub parts: response::Parts,
    /// The framed body.
    pub body: Bytes,
    /// Trailers (gRPC status), if any.
    pub trailers: Option<HeaderMap>,
}

impl Buffered {
    /// The gRPC status (0 = OK), if present.
    pub fn grpc_status(&self) -> Option<u32> {
        grpc::status_of(&self.parts.headers, self.trailers.as_ref())
    }

    /// Replays the response to the kubelet byte for byte.
    pub fn into_response(self) -> Response<ProxyBody> {
        Response::from_parts(self.parts, grpc::replay_body(self.body, self.trailers))
    }
}

/// Long-lived HTTP/2 connections to the runtime, used round-robin and
/// re-established when closed. HTTP/2 multiplexes, so a handful serve any
/// load; no call opens a connection of its own.
#[derive(Debug)]
pub struct Upstream {
    socket: PathBuf,
    slots: Box<[Mutex<Option<SendRequest<ProxyBody>>>]>,
    next: AtomicUsize,
    call_timeout: Duration,
}

/// Authority used on upstream requests (the socket decides where they go).
const UPSTREAM_URI: &str = "http://cri.runtime";

impl Upstream {
    /// A pool of `connections` connections to the runtime at `socket`.
    /// Connections are opened on first use.
    pub fn new(socket: impl Into<PathBuf>, connections: usize) -> Self {
        let slots = (0..connections.max(1)).map(|_| Mutex::new(None)).collect();
        Self {
            socket: socket.into(),
            slots,
            next: AtomicUsize::new(0),
            call_timeout: Duration::from_secs(30),
        }
    }

    /// The runtime socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn sender(&self) -> Result<SendRequest<ProxyBody>, UpstreamError> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let slot = &self.slots[index];
        if let Some(sender) = lock(slot).as_ref().filter(|s| !s.is_closed()) {
            return Ok(sender.clone());
        }
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| UpstreamError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| UpstreamError::Exchange {
                socket: self.socket.clone(),
                source,
            })?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "runtime connection closed");
            }
        });
        *lock(slot) = Some(sender.clone());
        Ok(sender)
    }

    /// Sends a request as is and returns the streaming response.
    pub async fn send(
        &self,
        mut request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut sender = self.sender().await?;
        if request.uri().authority().is_none() {
            let path = request
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            if let Ok(uri) = format!("{UPSTREAM_URI}{path}").parse() {
                *request.uri_mut() = uri;
            }
        }
        sender
            .ready()
            .await
            .map_err(|source| self.exchange_error(source))?;
        sender
            .send_request(request)
            .await
            .map_err(|source| self.exchange_error(source))
    }

    fn exchange_error(&self, source: hyper::Error) -> UpstreamError {
        UpstreamError::Exchange {
            socket: self.socket.clone(),
            source,
        }
    }

    /// Forwards an inspected request's original bytes and reads the whole
    /// answer.
    pub async fn forward_buffered(
        &self,
        parts: request::Parts,
        body: Bytes,
    ) -> Result<Buffered, UpstreamError> {
        let request = Request::from_parts(parts, full(body));
        let exchange = async {
            let response = self.send(request).await?;
            let (parts, body) = response.into_parts();
            let collected = body
                .collect()
                .await
                .map_err(|source| self.exchange_error(source))?;
            let trailers = collected.trailers().cloned();
            Ok(Buffered {
                parts,
                body: collected.to_bytes(),
                trailers,
            })
        };
        tokio::time::timeout(self.call_timeout, exchange)
            .await
            .map_err(|_| UpstreamError::Timeout {
                socket: self.socket.clone(),
                after: self.call_timeout,
            })?
    }

    /// Makes a unary call of credlet's own (e.g. an `ImageStatus` lookup)
    /// and decodes the answer.
    pub async fn unary<Req, Resp>(
        &self,
        path: &'static str,
        message: &Req,
    ) -> Result<Resp, UpstreamError>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        let request = Request::post(format!("{UPSTREAM_URI}{path}"))
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header("te", "trailers")
            .body(())
            .map_err(|e| UpstreamError::Malformed {
                path,
                reason: e.to_string(),
            })?;
        let (parts, ()) = request.into_parts();
        let buffered = self.forward_buffered(parts, grpc::frame(message)).await?;
        match buffered.grpc_status() {
            Some(0) => {}
            status => {
                let headers = buffered
                    .trailers
                    .as_ref()
                    .unwrap_or(&buffered.parts.headers);
                let message = headers
                    .get("grpc-message")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                return Err(UpstreamError::Status {
                    path,
                    status: status.unwrap_or(2),
                    message,
                });
            }
        }
        let inner = grpc::unary_message(&buffered.body).map_err(|e| UpstreamError::Malformed {
            path,
            reason: e.to_string(),
        })?;
        Resp::decode(inner).map_err(|e| UpstreamError::Malformed {
            path,
            reason: e.to_string(),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn full(body: Bytes) -> ProxyBody {
    http_body_util::Full::new(body)
        .map_err(|never| match never {})
        .boxed()
}

/// The proxy: serves the kubelet, forwards to the runtime.
pub struct CriProxy {
    upstream: Upstream,
    inspector: Arc<dyn Inspector>,
}

impl std::fmt::Debug for CriProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CriProxy")
            .field("upstream", &self.upstream.socket)
            .finish_non_exhaustive()
    }
}

impl CriProxy {
    /// A proxy to `upstream` deciding inspected calls with `inspector`.
    pub fn new(upstream: Upstream, inspector: Arc<dyn Inspector>) -> Self {
        Self {
            upstream,
            inspector,
        }
    }

    /// The runtime side.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Handles one request from the kubelet.
    pub async fn handle(&self, request: Request<Incoming>) -> Response<ProxyBody> {
        let Some(rpc) = Rpc::from_path(request.uri().path()) else {
            return self.pass_through(request).await;
        };
        let (parts, body) = request.into_parts();
        let body = match Limited::new(body, MAX_INSPECTED_MESSAGE + 5)
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(error) => {
                return grpc::error_response(
                    Code::InvalidArgument,
                    &format!("credlet could not read the {rpc:?} request: {error}"),
                );
            }
        };
        let message = match grpc::unary_message(&body) {
            Ok(message) => message,
            Err(error) => {
                return grpc::error_response(
                    Code::InvalidArgument,
                    &format!("credlet could not inspect the {rpc:?} request: {error}"),
                );
            }
        };
        let call = InspectedCall {
            rpc,
            parts,
            body,
            message,
        };
        self.inspector.inspect(call, &self.upstream).await
    }

    async fn pass_through(&self, request: Request<Incoming>) -> Response<ProxyBody> {
        let request = request.map(BodyExt::boxed);
        match self.upstream.send(request).await {
            Ok(response) => response.map(BodyExt::boxed),
            Err(error) => {
                tracing::warn!(%error, "runtime unavailable");
                error.to_response()
            }
        }
    }

    /// Serves kubelet connections on `listener` until `shutdown` resolves,
    /// then lets calls in flight finish (up to `drain`).
    pub async fn serve(
        self: Arc<Self>,
        listener: UnixListener,
        shutdown: impl Future<Output = ()>,
        drain: Duration,
    ) {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => {
                    let stream = match accepted {
                        Ok((stream, _)) => stream,
                        Err(error) => {
                            tracing::warn!(%error, "accepting a CRI connection");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let proxy = Arc::clone(&self);
                    let service = hyper::service::service_fn(move |request| {
                        let proxy = Arc::clone(&proxy);
                        async move { Ok::<_, Infallible>(proxy.handle(request).await) }
                    });
                    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service);
                    let connection = graceful.watch(connection);
                    tokio::spawn(async move {
                        if let Err(error) = connection.await {
                            tracing::debug!(%error, "kubelet connection closed");
                        }
                    });
                }
            }
        }
        if tokio::time::timeout(drain, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(?drain, "CRI calls still in flight after the drain period");
        }
    }
}
