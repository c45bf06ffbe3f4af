//! The CRI proxy: an HTTP/2 server on the kubelet's side, a small pool of
//! long-lived HTTP/2 connections to the real runtime on the other.
//!
//! Every CRI v1 call passes through as frames — headers, data and trailers
//! untouched, streaming calls included — except the few RPCs an
//! [`Inspector`] decides on. Those bodies are buffered (up to the kubelet's
//! own 16 MiB limit, no more than the message), handed to the inspector as
//! their original bytes, and either forwarded unchanged or answered by
//! credlet. If the runtime can not be reached the kubelet gets
//! `Unavailable`; nothing is ever allowed because something is missing.
//!
//! Deadlines are the caller's: a forwarded call carries its `grpc-timeout`
//! to the runtime unchanged and gets no deadline of credlet's (a pull may
//! take hours). The proxy answers `DeadlineExceeded` itself only when the
//! caller's deadline passes while credlet is still at work on the call
//! (reading it, or its own lookups); while the call is with the runtime,
//! the runtime's answer stands.
//!
//! Only `runtime.v1`'s RuntimeService and ImageService are served (see
//! [`Route`]): the runtime's socket also serves older CRI versions
//! (containerd 1.6: `runtime.v1alpha2`) and its own API, which would reach
//! it uninspected. The kubelet speaks nothing else since 1.26.

use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use http::{HeaderMap, Request, Response, request, response};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{UnixListener, UnixStream};

use crate::failure::Failure;
use crate::grpc::{self, BodyError, Code, MAX_INSPECTED_MESSAGE, ProxyBody, UnaryReader};

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
/// `RuntimeService/PodSandboxStatus` (credlet asks it which pod a sandbox
/// was run for).
pub const POD_SANDBOX_STATUS: &str = "/runtime.v1.RuntimeService/PodSandboxStatus";

/// The services the proxy serves, as path prefixes.
const SERVED: [&str; 2] = ["/runtime.v1.RuntimeService/", "/runtime.v1.ImageService/"];

/// What the proxy does with a call, by its path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Buffered and decided by the inspector.
    Inspect(Rpc),
    /// Forwarded as it is.
    PassThrough,
    /// Answered with `Unimplemented` and this message: a service the
    /// guard does not serve.
    Refuse(String),
}

impl Route {
    /// The route of a request path.
    pub fn of(path: &str) -> Self {
        if let Some(rpc) = Rpc::from_path(path) {
            return Self::Inspect(rpc);
        }
        if SERVED.iter().any(|prefix| path.starts_with(prefix)) {
            return Self::PassThrough;
        }
        let service = path
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or_default();
        let service: String = service.chars().take(100).collect();
        if service.starts_with("runtime.v1alpha2.") {
            return Self::Refuse(format!(
                "credlet: CRI runtime.v1alpha2 ({service}) is not served through the image guard, which only inspects runtime.v1; the kubelet speaks runtime.v1 since 1.26"
            ));
        }
        Self::Refuse(format!(
            "credlet: {service:?} is not served through the image guard; it serves only the CRI v1 services runtime.v1.RuntimeService and runtime.v1.ImageService"
        ))
    }
}

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

/// An inspected call the proxy itself could not take to the inspector, or
/// whose deadline passed while credlet was at work on it.
#[derive(Debug)]
pub struct CallFailure<'a> {
    /// Which RPC.
    pub rpc: Rpc,
    /// Why.
    pub failure: Failure,
    /// The request's message, when it was read whole (to name its pod and
    /// image).
    pub message: Option<&'a Bytes>,
    /// What happened, for the log.
    pub detail: &'a str,
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

    /// Reports a call the proxy answered with an error before or instead
    /// of the inspector's answer (oversized or unreadable request, the
    /// caller's deadline). Called once per such call; the default logs it.
    fn failed(&self, failure: &CallFailure<'_>) {
        tracing::warn!(
            rpc = ?failure.rpc,
            reason = %failure.failure,
            detail = failure.detail,
            "inspected CRI call failed"
        );
    }
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
        source: BodyError,
    },
    /// The runtime did not answer a call of credlet's own in time.
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
    /// The runtime's answer to an inspected call is larger than the proxy
    /// reads (the kubelet could not take it either).
    #[error("container runtime at {socket:?} answered with more than {max} bytes")]
    TooLarge {
        /// The runtime socket.
        socket: PathBuf,
        /// The limit.
        max: usize,
    },
}

impl UpstreamError {
    /// The kubelet-facing response for this failure: the runtime's own code
    /// when it answered a lookup of credlet's with an error (an ambiguous
    /// short id is not a reason to retry), else `Unavailable`.
    pub fn to_response(&self) -> Response<ProxyBody> {
        match self {
            Self::Status { status, .. } if *status != 0 => {
                grpc::status_response(*status, &format!("credlet: {self}"))
            }
            _ => grpc::error_response(Code::Unavailable, &self.to_string()),
        }
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

    /// The gRPC message (percent-decoded), or nothing.
    pub fn grpc_message(&self) -> String {
        self.trailers
            .as_ref()
            .and_then(|t| t.get("grpc-message"))
            .or_else(|| self.parts.headers.get("grpc-message"))
            .and_then(|v| v.to_str().ok())
            .map(grpc::percent_decode)
            .unwrap_or_default()
    }

    /// Replays the response to the kubelet byte for byte.
    pub fn into_response(self) -> Response<ProxyBody> {
        Response::from_parts(self.parts, grpc::replay_body(self.body, self.trailers))
    }
}

/// Long-lived HTTP/2 connections to the runtime, used round-robin and
/// re-established when closed. HTTP/2 multiplexes, so a handful serve any
/// load; no call opens a connection of its own.
///
/// The runtime side speaks `h2` directly rather than through hyper's client:
/// a request's headers and its first data frame are queued together, so a
/// unary call reaches the runtime in one write (one wake-up of the runtime
/// instead of two).
#[derive(Debug)]
pub struct Upstream {
    socket: PathBuf,
    slots: Box<[Mutex<Option<SendRequest<Bytes>>>]>,
    next: AtomicUsize,
}

/// How long credlet waits for the runtime to answer a call of its own
/// (`ImageStatus`, `PodSandboxStatus`, …). Calls it forwards get no
/// deadline but their caller's: a pull may take hours.
pub const OWN_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Authority used on upstream requests (the socket decides where they go).
const UPSTREAM_URI: &str = "http://cri.runtime";

/// Receive windows towards the runtime (as large as hyper's defaults, so a
/// big `ListImages` answer does not wait for window updates).
const STREAM_WINDOW: u32 = 2 << 20;
const CONNECTION_WINDOW: u32 = 5 << 20;

impl Upstream {
    /// A pool of `connections` connections to the runtime at `socket`.
    /// Connections are opened on first use.
    pub fn new(socket: impl Into<PathBuf>, connections: usize) -> Self {
        let slots = (0..connections.max(1)).map(|_| Mutex::new(None)).collect();
        Self {
            socket: socket.into(),
            slots,
            next: AtomicUsize::new(0),
        }
    }

    /// The runtime socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn connect(
        &self,
        slot: &Mutex<Option<SendRequest<Bytes>>>,
    ) -> Result<SendRequest<Bytes>, UpstreamError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| UpstreamError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(|source| self.exchange_error(source))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "runtime connection closed");
            }
        });
        *lock(slot) = Some(sender.clone());
        Ok(sender)
    }

    /// Sends a request as is and returns the streaming response. A closed
    /// pooled connection is replaced once before the call fails.
    pub async fn send(
        &self,
        request: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let (mut head, body) = request.into_parts();
        if head.uri.authority().is_none() {
            let path = head.uri.path_and_query().map_or("/", |p| p.as_str());
            if let Ok(uri) = format!("{UPSTREAM_URI}{path}").parse() {
                head.uri = uri;
            }
        }
        // HTTP/2 carries no connection-specific headers.
        head.headers.remove(http::header::CONNECTION);
        head.headers.remove(http::header::HOST);
        let end_of_stream = body.is_end_stream();
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let slot = &self.slots[index];
        let pooled = lock(slot).clone();
        let sender = match pooled {
            Some(sender) => sender,
            None => self.connect(slot).await?,
        };
        let (response, stream) = match self.start(sender, &head, end_of_stream).await {
            Ok(started) => started,
            // The pooled connection went away (runtime restart): one retry
            // on a fresh connection; the body has not been touched yet.
            Err(_) => {
                let sender = self.connect(slot).await?;
                self.start(sender, &head, end_of_stream)
                    .await
                    .map_err(|source| self.exchange_error(source))?
            }
        };
        if let Some(stream) = stream {
            let mut pipe = Box::pin(pipe_request_body(body, stream));
            // Poll once here: a unary request's message is usually already
            // buffered and joins its headers in the same write.
            let first = std::future::poll_fn(|cx| Poll::Ready(pipe.as_mut().poll(cx))).await;
            if first.is_pending() {
                tokio::spawn(pipe);
            }
        }
        let response = response
            .await
            .map_err(|source| self.exchange_error(source))?;
        Ok(response.map(|recv| {
            BodyExt::boxed(RuntimeBody {
                recv,
                data_done: false,
            })
        }))
    }

    async fn start(
        &self,
        sender: SendRequest<Bytes>,
        head: &request::Parts,
        end_of_stream: bool,
    ) -> Result<(h2::client::ResponseFuture, Option<h2::SendStream<Bytes>>), h2::Error> {
        let mut sender = sender.ready().await?;
        let mut request = Request::new(());
        *request.method_mut() = head.method.clone();
        *request.uri_mut() = head.uri.clone();
        *request.headers_mut() = head.headers.clone();
        let (response, stream) = sender.send_request(request, end_of_stream)?;
        Ok((response, (!end_of_stream).then_some(stream)))
    }

    fn exchange_error(&self, source: impl Into<BodyError>) -> UpstreamError {
        UpstreamError::Exchange {
            socket: self.socket.clone(),
            source: source.into(),
        }
    }

    /// Forwards an inspected request's original bytes and reads the whole
    /// answer (up to the kubelet's message limit). No deadline of
    /// credlet's: the caller's `grpc-timeout` travels with the request to
    /// the runtime unchanged, and a caller that gives up resets the stream,
    /// which ends this call.
    pub async fn forward_buffered(
        &self,
        parts: request::Parts,
        body: Bytes,
    ) -> Result<Buffered, UpstreamError> {
        // The runtime's copy of the caller's deadline governs from here.
        let _at_runtime = parts.extensions.get::<AtRuntime>().map(AtRuntime::enter);
        let request = Request::from_parts(parts, full(body));
        let response = self.send(request).await?;
        let (parts, body) = response.into_parts();
        let (body, trailers) = self.read_answer(body).await?;
        Ok(Buffered {
            parts,
            body,
            trailers,
        })
    }

    /// Reads an answer whole: its data (one buffer) and trailers. More
    /// than the kubelet's message limit is an error.
    async fn read_answer(
        &self,
        mut body: ProxyBody,
    ) -> Result<(Bytes, Option<HeaderMap>), UpstreamError> {
        let max = MAX_INSPECTED_MESSAGE + 5;
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut len = 0usize;
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|source| self.exchange_error(source))?;
            match frame.into_data() {
                Ok(data) => {
                    len += data.len();
                    if len > max {
                        return Err(UpstreamError::TooLarge {
                            socket: self.socket.clone(),
                            max,
                        });
                    }
                    chunks.push(data);
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers = Some(t);
                    }
                }
            }
        }
        let body = match chunks.len() {
            0 => Bytes::new(),
            1 => chunks.swap_remove(0),
            _ => chunks.concat().into(),
        };
        Ok((body, trailers))
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
        self.unary_with(path, message, &[]).await
    }

    /// [`Upstream::unary`] with extra request headers (containerd's own
    /// API wants its namespace in `containerd-namespace`).
    pub async fn unary_with<Req, Resp>(
        &self,
        path: &'static str,
        message: &Req,
        headers: &[(&'static str, &str)],
    ) -> Result<Resp, UpstreamError>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        let body = self.own_call(path, message, headers).await?;
        let inner = grpc::unary_message(&body).map_err(|e| UpstreamError::Malformed {
            path,
            reason: e.to_string(),
        })?;
        Resp::decode(inner).map_err(|e| UpstreamError::Malformed {
            path,
            reason: e.to_string(),
        })
    }

    /// A server-streaming call of credlet's own, its answers read whole.
    pub async fn server_stream<Req, Resp>(
        &self,
        path: &'static str,
        message: &Req,
        headers: &[(&'static str, &str)],
    ) -> Result<Vec<Resp>, UpstreamError>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        let body = self.own_call(path, message, headers).await?;
        let malformed = |reason: String| UpstreamError::Malformed { path, reason };
        grpc::stream_messages(&body)
            .map_err(|e| malformed(e.to_string()))?
            .into_iter()
            .map(|m| Resp::decode(m).map_err(|e| malformed(e.to_string())))
            .collect()
    }

    /// Sends one message of credlet's own, within [`OWN_CALL_TIMEOUT`], and
    /// returns the answer's body once its status is OK.
    async fn own_call(
        &self,
        path: &'static str,
        message: &impl prost::Message,
        headers: &[(&'static str, &str)],
    ) -> Result<Bytes, UpstreamError> {
        let mut request = Request::post(format!("{UPSTREAM_URI}{path}"))
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header("te", "trailers");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(()).map_err(|e| UpstreamError::Malformed {
            path,
            reason: e.to_string(),
        })?;
        let (parts, ()) = request.into_parts();
        let buffered = tokio::time::timeout(
            OWN_CALL_TIMEOUT,
            self.forward_buffered(parts, grpc::frame(message)),
        )
        .await
        .map_err(|_| UpstreamError::Timeout {
            socket: self.socket.clone(),
            after: OWN_CALL_TIMEOUT,
        })??;
        match buffered.grpc_status() {
            Some(0) => Ok(buffered.body),
            status => {
                let headers = buffered
                    .trailers
                    .as_ref()
                    .unwrap_or(&buffered.parts.headers);
                let message = headers
                    .get("grpc-message")
                    .and_then(|v| v.to_str().ok())
                    .map(grpc::percent_decode)
                    .unwrap_or_default();
                Err(UpstreamError::Status {
                    path,
                    status: status.unwrap_or(2),
                    message,
                })
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether an inspected call is with the runtime right now: the proxy puts
/// one in the request's extensions, [`Upstream::forward_buffered`] holds it
/// set while it forwards. When the caller's deadline passes then, the
/// runtime (which got the caller's `grpc-timeout`) answers, not credlet.
#[derive(Clone, Debug, Default)]
struct AtRuntime(Arc<AtomicBool>);

impl AtRuntime {
    fn enter(&self) -> AtRuntimeGuard {
        self.0.store(true, Ordering::SeqCst);
        AtRuntimeGuard(Arc::clone(&self.0))
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Clears [`AtRuntime`] when the forwarded call is over.
struct AtRuntimeGuard(Arc<AtomicBool>);

impl Drop for AtRuntimeGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Why an inspected request could not be read whole.
#[derive(Debug)]
enum ReadError {
    /// Not one unary message within the limit.
    Frame(grpc::FrameError),
    /// The body broke off (the caller reset the stream).
    Body(hyper::Error),
}

impl ReadError {
    fn failure(&self) -> Failure {
        match self {
            Self::Frame(error) => Failure::of_frame(error),
            Self::Body(_) => Failure::Undecodable,
        }
    }

    fn code(&self) -> Code {
        match self {
            Self::Frame(grpc::FrameError::TooLarge { .. }) => Code::ResourceExhausted,
            _ => Code::InvalidArgument,
        }
    }
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Frame(error) => error.fmt(f),
            Self::Body(error) => write!(f, "the request body broke off: {error}"),
        }
    }
}

/// Reads an inspected request's body as it arrives: refused as soon as its
/// prefix announces more than the proxy inspects, and never buffered
/// beyond the one message.
async fn read_unary(mut body: Incoming) -> Result<Bytes, ReadError> {
    let mut reader = UnaryReader::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(ReadError::Body)?;
        if let Ok(data) = frame.into_data() {
            reader.push(&data).map_err(ReadError::Frame)?;
        }
    }
    reader.finish().map_err(ReadError::Frame)
}

fn full(body: Bytes) -> ProxyBody {
    http_body_util::Full::new(body)
        .map_err(|never| match never {})
        .boxed()
}

/// Copies a request body into an h2 stream, frame by frame. The first data
/// frame is queued at once (it is small and joins the headers), with the
/// end of the stream when the body has already ended; later frames wait
/// for send window, so at most one frame is buffered.
async fn pipe_request_body(mut body: ProxyBody, mut stream: h2::SendStream<Bytes>) {
    let mut ahead = None;
    let mut first = true;
    loop {
        if !first {
            stream.reserve_capacity(1);
            while stream.capacity() == 0 {
                match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
                    Some(Ok(_)) => {}
                    Some(Err(error)) => {
                        tracing::debug!(%error, "runtime stream closed while sending");
                        return;
                    }
                    None => return,
                }
            }
        }
        first = false;
        let frame = match ahead.take() {
            Some(frame) => Some(frame),
            None => body.frame().await,
        };
        let frame = match frame {
            Some(Ok(frame)) => frame,
            Some(Err(error)) => {
                tracing::debug!(%error, "kubelet request body failed");
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
            None => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
        };
        let sent = match frame.into_data() {
            Ok(data) => {
                // Whether the body ends right here is often known only by
                // polling once more; a frame that is not ready yet is not
                // waited for (a streaming client may wait for an answer).
                let end = body.is_end_stream()
                    || match std::future::poll_fn(|cx| {
                        Poll::Ready(Pin::new(&mut body).poll_frame(cx))
                    })
                    .await
                    {
                        Poll::Ready(None) => true,
                        Poll::Ready(Some(next)) => {
                            ahead = Some(next);
                            false
                        }
                        Poll::Pending => false,
                    };
                let sent = stream.send_data(data, end);
                if end {
                    return;
                }
                sent
            }
            Err(frame) => match frame.into_trailers() {
                Ok(trailers) => return drop(stream.send_trailers(trailers)),
                Err(_) => Ok(()),
            },
        };
        if let Err(error) = sent {
            tracing::debug!(%error, "runtime stream closed while sending");
            return;
        }
    }
}

/// A runtime response body: data frames (their window released as they
/// are read, so backpressure follows the kubelet), then trailers.
struct RuntimeBody {
    recv: h2::RecvStream,
    data_done: bool,
}

impl http_body::Body for RuntimeBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BodyError>>> {
        if !self.data_done {
            match std::task::ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error.into()))),
                None => self.data_done = true,
            }
        }
        match std::task::ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(error) => Poll::Ready(Some(Err(error.into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
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
        let rpc = match Route::of(request.uri().path()) {
            Route::Inspect(rpc) => rpc,
            Route::PassThrough => return self.pass_through(request).await,
            Route::Refuse(message) => {
                tracing::warn!(
                    path = request.uri().path(),
                    "CRI call of a service the image guard does not serve refused"
                );
                return grpc::error_response(Code::Unimplemented, &message);
            }
        };
        let (mut parts, body) = request.into_parts();
        let deadline = grpc::grpc_timeout(&parts.headers).map(|t| tokio::time::Instant::now() + t);
        let timeout = parts
            .headers
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let read = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, read_unary(body)).await {
                Ok(read) => read,
                Err(_) => return self.deadline_passed(rpc, &timeout, None),
            },
            None => read_unary(body).await,
        };
        let body = match read {
            Ok(body) => body,
            Err(error) => {
                let detail = format!("credlet could not inspect the {rpc:?} request: {error}");
                self.inspector.failed(&CallFailure {
                    rpc,
                    failure: error.failure(),
                    message: None,
                    detail: &detail,
                });
                return grpc::error_response(error.code(), &detail);
            }
        };
        let message = body.slice(5..);
        let at_runtime = AtRuntime::default();
        parts.extensions.insert(at_runtime.clone());
        let Some(deadline) = deadline else {
            let call = InspectedCall {
                rpc,
                parts,
                body,
                message,
            };
            return self.inspector.inspect(call, &self.upstream).await;
        };
        let call = InspectedCall {
            rpc,
            parts,
            body,
            message: message.clone(),
        };
        let inspection = self.inspector.inspect(call, &self.upstream);
        tokio::pin!(inspection);
        tokio::select! {
            response = &mut inspection => return response,
            () = tokio::time::sleep_until(deadline) => {}
        }
        if at_runtime.is_set() {
            // With the runtime, whose copy of the deadline started later
            // (after credlet's own lookups): its answer is the caller's.
            return inspection.await;
        }
        self.deadline_passed(rpc, &timeout, Some(&message))
    }

    /// Answers a call whose caller's deadline passed while credlet was at
    /// work on it (the caller has given up by now; a client that enforces
    /// no deadline of its own still gets an answer).
    fn deadline_passed(
        &self,
        rpc: Rpc,
        timeout: &str,
        message: Option<&Bytes>,
    ) -> Response<ProxyBody> {
        let detail = format!(
            "credlet: the caller's deadline (grpc-timeout {timeout}) passed while the image guard was deciding the {rpc:?} call"
        );
        self.inspector.failed(&CallFailure {
            rpc,
            failure: Failure::Timeout,
            message,
            detail: &detail,
        });
        grpc::error_response(Code::DeadlineExceeded, &detail)
    }

    async fn pass_through(&self, request: Request<Incoming>) -> Response<ProxyBody> {
        let request = request.map(|body| body.map_err(BodyError::from).boxed());
        match self.upstream.send(request).await {
            Ok(response) => response,
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
                    // gRPC C-core clients (Python, C++) and grpc-go dialled
                    // with a bare path send the socket path as `:authority`,
                    // which the runtime accepts and h2 alone would reset.
                    let stream = credlet_uds::Normalized::new(stream);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let table = [
            (IMAGE_STATUS, Some(Route::Inspect(Rpc::ImageStatus))),
            (PULL_IMAGE, Some(Route::Inspect(Rpc::PullImage))),
            (CREATE_CONTAINER, Some(Route::Inspect(Rpc::CreateContainer))),
            (
                "/runtime.v1.RuntimeService/Version",
                Some(Route::PassThrough),
            ),
            (POD_SANDBOX_STATUS, Some(Route::PassThrough)),
            (
                "/runtime.v1.ImageService/ListImages",
                Some(Route::PassThrough),
            ),
            (
                "/runtime.v1.RuntimeService/GetContainerEvents",
                Some(Route::PassThrough),
            ),
            ("/runtime.v1alpha2.RuntimeService/CreateContainer", None),
            ("/runtime.v1alpha2.ImageService/PullImage", None),
            ("/runtime.v1alpha2.RuntimeService/Version", None),
            ("/containerd.services.tasks.v1.Tasks/Create", None),
            ("/grpc.health.v1.Health/Check", None),
            ("/runtime.v1.RuntimeServiceX/Version", None),
            ("/runtime.v1.RuntimeService", None),
            ("/", None),
            ("", None),
        ];
        for (path, want) in table {
            let route = Route::of(path);
            match want {
                Some(want) => assert_eq!(route, want, "{path}"),
                None => {
                    let Route::Refuse(message) = &route else {
                        panic!("{path}: {route:?}");
                    };
                    assert!(message.starts_with("credlet: "), "{message}");
                    if path.contains("v1alpha2") {
                        assert!(message.contains("runtime.v1alpha2"), "{message}");
                    }
                }
            }
        }
        let Route::Refuse(long) = Route::of(&format!("/{}/x", "a".repeat(10_000))) else {
            panic!("refused");
        };
        assert!(long.len() < 400, "{}", long.len());
    }
}
