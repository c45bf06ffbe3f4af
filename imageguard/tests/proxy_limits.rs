//! The proxy's limits and deadlines against a runtime stand-in that shows
//! what reached it: an HTTP/2 server on a Unix socket answering every call
//! with the `grpc-timeout` and the body length it received (after a delay
//! the test sets). No containerd: what is checked is the proxy's own
//! framing and timing, in milliseconds.

mod support;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use credlet_imageguard::failure::Failure;
use credlet_imageguard::grpc::{self, MAX_INSPECTED_MESSAGE, ProxyBody};
use credlet_imageguard::proxy::{
    BoxFuture, CallFailure, IMAGE_STATUS, InspectedCall, Inspector, PassThrough, Rpc, Upstream,
};
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::Proxy;

/// What the stand-in runtime saw of the last call.
#[derive(Clone, Debug, Default)]
struct Seen {
    grpc_timeout: Option<String>,
    body_len: usize,
}

/// A runtime stand-in on `dir/runtime.sock`: answers OK after `delay`,
/// with `x-seen-grpc-timeout` and `x-seen-length` headers.
fn runtime(dir: &Path, delay: Duration) -> (PathBuf, Arc<Mutex<Seen>>) {
    let socket = dir.join("runtime.sock");
    let listener = tokio::net::UnixListener::bind(&socket).expect("bind runtime");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let shared = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let seen = Arc::clone(&shared);
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let seen = Arc::clone(&seen);
                    async move {
                        let timeout = request
                            .headers()
                            .get("grpc-timeout")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        let body = request.into_body().collect().await?.to_bytes();
                        *seen.lock().expect("seen") = Seen {
                            grpc_timeout: timeout.clone(),
                            body_len: body.len(),
                        };
                        tokio::time::sleep(delay).await;
                        let response = Response::builder()
                            .header("content-type", "application/grpc")
                            .header("grpc-status", "0")
                            .header("x-seen-grpc-timeout", timeout.unwrap_or_default())
                            .header("x-seen-length", body.len().to_string())
                            .body(Full::new(Bytes::new()))
                            .expect("response");
                        Ok::<_, hyper::Error>(response)
                    }
                });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    (socket, seen)
}

/// One unary call to the proxy: the answer's gRPC status, message and
/// headers.
async fn call(
    socket: &Path,
    path: &str,
    grpc_timeout: Option<&str>,
    body: Bytes,
) -> (Option<u32>, String, HeaderMap) {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(connection);
    let mut request = Request::post(format!("http://cri{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(timeout) = grpc_timeout {
        request = request.header("grpc-timeout", timeout);
    }
    let request = request.body(Full::new(body)).expect("request");
    let response = sender.send_request(request).await.expect("response");
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.expect("body");
    let trailers = collected.trailers().cloned();
    let status = grpc::status_of(&parts.headers, trailers.as_ref());
    let message = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-message"))
        .or_else(|| parts.headers.get("grpc-message"))
        .and_then(|v| v.to_str().ok())
        .map(grpc::percent_decode)
        .unwrap_or_default();
    (status, message, parts.headers)
}

/// An `ImageStatus` request of about `size` bytes, framed.
fn image_status(size: usize) -> Bytes {
    grpc::frame(&credlet_proto::cri::ImageStatusRequest {
        image: Some(credlet_proto::cri::ImageSpec {
            image: "registry.example/app:v1".into(),
            annotations: [("big".to_owned(), "x".repeat(size))].into(),
            ..Default::default()
        }),
        verbose: false,
    })
}

/// Forwards like [`PassThrough`], after `work` of its own; records the
/// failures the proxy reports.
#[derive(Default)]
struct Slow {
    work: Duration,
    failures: Mutex<Vec<(Rpc, Failure, bool)>>,
}

impl Inspector for Slow {
    fn inspect<'a>(
        &'a self,
        call: InspectedCall,
        upstream: &'a Upstream,
    ) -> BoxFuture<'a, Response<ProxyBody>> {
        Box::pin(async move {
            tokio::time::sleep(self.work).await;
            PassThrough.inspect(call, upstream).await
        })
    }

    fn failed(&self, failure: &CallFailure<'_>) {
        self.failures.lock().expect("failures").push((
            failure.rpc,
            failure.failure,
            failure.message.is_some(),
        ));
    }
}

#[tokio::test]
async fn a_message_up_to_the_kubelets_limit_reaches_the_runtime_unchanged() {
    let dir = tempfile::tempdir().expect("dir");
    let (upstream, runtime_saw) = runtime(dir.path(), Duration::ZERO);
    let inspector = Arc::new(Slow::default());
    let proxy = Proxy::start(&upstream, inspector.clone()).await;

    // 5 MB, more than the 4 MiB the proxy once took, and the caller's
    // deadline: both reach the runtime as sent.
    let body = image_status(5_000_000);
    let (status, message, headers) =
        call(&proxy.socket, IMAGE_STATUS, Some("120S"), body.clone()).await;
    assert_eq!(status, Some(0), "{message}");
    assert_eq!(headers["x-seen-grpc-timeout"], "120S");
    let seen = runtime_saw.lock().expect("seen").clone();
    assert_eq!(seen.grpc_timeout.as_deref(), Some("120S"));
    assert_eq!(seen.body_len, body.len());

    // No deadline from the caller: none added.
    let (status, _, headers) = call(&proxy.socket, IMAGE_STATUS, None, image_status(10)).await;
    assert_eq!(status, Some(0));
    assert_eq!(headers["x-seen-grpc-timeout"], "");

    // Over the limit: refused from the prefix, as ResourceExhausted, and
    // reported once; the runtime sees nothing.
    let mut oversized = vec![0u8];
    oversized.extend_from_slice(
        &u32::try_from(MAX_INSPECTED_MESSAGE + 1)
            .expect("u32")
            .to_be_bytes(),
    );
    oversized.extend_from_slice(&[0; 1024]);
    *runtime_saw.lock().expect("seen") = Seen::default();
    let (status, message, _) =
        call(&proxy.socket, IMAGE_STATUS, None, Bytes::from(oversized)).await;
    assert_eq!(status, Some(8), "{message}");
    assert!(message.contains("larger than"), "{message}");
    assert_eq!(runtime_saw.lock().expect("seen").body_len, 0);

    // Not a gRPC message: InvalidArgument, reported as undecodable.
    let (status, _, _) = call(
        &proxy.socket,
        IMAGE_STATUS,
        None,
        Bytes::from_static(b"\x01\0\0\0\x01x"),
    )
    .await;
    assert_eq!(status, Some(3));
    assert_eq!(
        *inspector.failures.lock().expect("failures"),
        [
            (Rpc::ImageStatus, Failure::Oversized, false),
            (Rpc::ImageStatus, Failure::Undecodable, false),
        ]
    );
    proxy.stop().await;
}

#[tokio::test]
async fn the_proxy_answers_deadline_exceeded_only_for_its_own_work() {
    let dir = tempfile::tempdir().expect("dir");
    // A runtime slower than the caller's deadline: its answer stands.
    let (upstream, _) = runtime(dir.path(), Duration::from_millis(400));
    let inspector = Arc::new(Slow::default());
    let proxy = Proxy::start(&upstream, inspector.clone()).await;
    let (status, message, headers) =
        call(&proxy.socket, IMAGE_STATUS, Some("100m"), image_status(10)).await;
    assert_eq!(status, Some(0), "{message}");
    assert_eq!(headers["x-seen-grpc-timeout"], "100m");
    assert!(inspector.failures.lock().expect("failures").is_empty());
    proxy.stop().await;

    // An inspector slower than the deadline: DeadlineExceeded from the
    // proxy when the deadline passes, reported as a timeout with the
    // request (to name its pod and image).
    let dir = tempfile::tempdir().expect("dir");
    let (upstream, seen) = runtime(dir.path(), Duration::ZERO);
    let inspector = Arc::new(Slow {
        work: Duration::from_secs(5),
        ..Slow::default()
    });
    let proxy = Proxy::start(&upstream, inspector.clone()).await;
    let started = Instant::now();
    let (status, message, _) =
        call(&proxy.socket, IMAGE_STATUS, Some("200m"), image_status(10)).await;
    let took = started.elapsed();
    assert_eq!(status, Some(4), "{message}");
    assert!(message.contains("grpc-timeout 200m"), "{message}");
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(
        *inspector.failures.lock().expect("failures"),
        [(Rpc::ImageStatus, Failure::Timeout, true)]
    );
    assert!(
        seen.lock().expect("seen").grpc_timeout.is_none(),
        "never forwarded"
    );
    proxy.stop().await;
}

/// gRPC C-core clients (Python, C++) and grpc-go dialled with a bare path
/// send the percent-encoded socket path as `:authority`; the runtime takes
/// it, so the proxy does too, on pass-through and inspected calls alike
/// (h2 alone answered RST_STREAM PROTOCOL_ERROR).
#[tokio::test]
async fn a_socket_path_as_authority_is_served() {
    let dir = tempfile::tempdir().expect("dir");
    let (upstream, runtime_saw) = runtime(dir.path(), Duration::ZERO);
    let proxy = Proxy::start(&upstream, Arc::new(PassThrough)).await;
    let authority = proxy.socket.display().to_string().replace('/', "%2F");
    for (method, message) in [
        ("/runtime.v1.RuntimeService/Version", Bytes::new()),
        (IMAGE_STATUS, image_status(10).slice(5..)),
    ] {
        let (status, _) =
            credlet_test_util::raw_unary_call(&proxy.socket, &authority, method, &message)
                .await
                .unwrap_or_else(|e| panic!("{method} with a path :authority: {e:#}"));
        assert_eq!(status, "0", "{method}");
        assert_eq!(
            runtime_saw.lock().expect("seen").body_len,
            message.len() + 5
        );
    }
    proxy.stop().await;
}
