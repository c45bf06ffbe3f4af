//! Just enough gRPC framing for a proxy: the 5-byte length-prefixed message
//! of a unary call, and status-only responses.
//!
//! Inspected requests are decoded from their original bytes and forwarded
//! unchanged; only responses credlet gives itself are encoded here.

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;

/// Error of a body on either side of the proxy (hyper's on the kubelet
/// side, h2's on the runtime side).
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// Body type on both sides of the proxy.
pub type ProxyBody = BoxBody<Bytes, BodyError>;

/// Largest unary message the proxy buffers to inspect (CRI requests are
/// small; a PullImageRequest with a sandbox config is a few KiB).
pub const MAX_INSPECTED_MESSAGE: usize = 4 << 20;

/// Why a gRPC frame could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer bytes than the 5-byte prefix announces.
    #[error("gRPC frame truncated: {len} bytes, expected {expected}")]
    Truncated {
        /// Bytes present.
        len: usize,
        /// Bytes announced.
        expected: usize,
    },
    /// More than one message in a unary body.
    #[error("gRPC unary body has {extra} bytes after the message")]
    TrailingBytes {
        /// Extra bytes.
        extra: usize,
    },
    /// A compressed message: the proxy can not inspect it.
    #[error("compressed gRPC messages can not be inspected")]
    Compressed,
    /// The message is larger than the proxy inspects.
    #[error("gRPC message of {len} bytes is larger than the {max} the proxy inspects")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Returns the message inside a unary gRPC body.
pub fn unary_message(body: &Bytes) -> Result<Bytes, FrameError> {
    if body.len() < 5 {
        return Err(FrameError::Truncated {
            len: body.len(),
            expected: 5,
        });
    }
    if body[0] != 0 {
        return Err(FrameError::Compressed);
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if len > MAX_INSPECTED_MESSAGE {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_INSPECTED_MESSAGE,
        });
    }
    let end = 5 + len;
    if body.len() < end {
        return Err(FrameError::Truncated {
            len: body.len(),
            expected: end,
        });
    }
    if body.len() > end {
        return Err(FrameError::TrailingBytes {
            extra: body.len() - end,
        });
    }
    Ok(body.slice(5..end))
}

/// Frames one message for a unary body.
pub fn frame(message: &impl prost::Message) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    // Encoding into a buffer with enough capacity can not fail.
    let _ = message.encode(&mut buf);
    buf.freeze()
}

/// gRPC status codes the proxy answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    /// 0
    Ok = 0,
    /// 3
    InvalidArgument = 3,
    /// 4
    DeadlineExceeded = 4,
    /// 5
    NotFound = 5,
    /// 7
    PermissionDenied = 7,
    /// 9
    FailedPrecondition = 9,
    /// 12
    Unimplemented = 12,
    /// 13
    Internal = 13,
    /// 14
    Unavailable = 14,
    /// 16
    Unauthenticated = 16,
}

fn grpc_headers(headers: &mut HeaderMap) {
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
}

/// A successful unary response carrying `message`.
pub fn ok_response(message: &impl prost::Message) -> Response<ProxyBody> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let body = http_body_util::StreamBody::new(futures_stream(frame(message), trailers));
    let mut response = Response::new(BodyExt::boxed(body));
    *response.status_mut() = StatusCode::OK;
    grpc_headers(response.headers_mut());
    response
}

/// A trailers-only error response.
pub fn error_response(code: Code, message: &str) -> Response<ProxyBody> {
    let mut response = Response::new(
        http_body_util::Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    let headers = response.headers_mut();
    grpc_headers(headers);
    headers.insert("grpc-status", HeaderValue::from(u16::from(code as u8)));
    headers.insert(
        "grpc-message",
        HeaderValue::from_str(&percent_encode(message))
            .unwrap_or_else(|_| HeaderValue::from_static("error")),
    );
    response
}

/// Percent-encodes a grpc-message (printable ASCII except `%` stays).
pub fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The gRPC status of a finished response: trailers, or headers for a
/// trailers-only response. `None` if absent or unparsable.
pub fn status_of(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> Option<u32> {
    trailers
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

fn futures_stream(
    data: Bytes,
    trailers: HeaderMap,
) -> impl futures_core::Stream<Item = Result<http_body::Frame<Bytes>, BodyError>> + Send + Sync + 'static
{
    TwoFrames {
        data: Some(data),
        trailers: Some(trailers),
    }
}

/// A data frame followed by a trailers frame.
struct TwoFrames {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl futures_core::Stream for TwoFrames {
    type Item = Result<http_body::Frame<Bytes>, BodyError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if let Some(data) = self.data.take() {
            return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(data))));
        }
        std::task::Poll::Ready(
            self.trailers
                .take()
                .map(|t| Ok(http_body::Frame::trailers(t))),
        )
    }
}

/// A body of one data frame and optional trailers, to replay a buffered
/// upstream response byte for byte.
pub fn replay_body(data: Bytes, trailers: Option<HeaderMap>) -> ProxyBody {
    BodyExt::boxed(http_body_util::StreamBody::new(TwoFrames {
        data: Some(data),
        trailers,
    }))
}

#[cfg(test)]
mod tests {
    use credlet_proto::cri::PullImageResponse;
    use prost::Message;

    use super::*;

    #[test]
    fn frame_round_trip() {
        let message = PullImageResponse {
            image_ref: "sha256:abc".into(),
        };
        let framed = frame(&message);
        let inner = unary_message(&framed).expect("unframe");
        assert_eq!(PullImageResponse::decode(inner).expect("decode"), message);
    }

    #[test]
    fn malformed_frames() {
        assert!(matches!(
            unary_message(&Bytes::from_static(b"\0\0\0")),
            Err(FrameError::Truncated { .. })
        ));
        assert_eq!(
            unary_message(&Bytes::from_static(b"\x01\0\0\0\0")),
            Err(FrameError::Compressed)
        );
        assert!(matches!(
            unary_message(&Bytes::from_static(b"\0\0\0\0\x05ab")),
            Err(FrameError::Truncated { .. })
        ));
        assert_eq!(
            unary_message(&Bytes::from_static(b"\0\0\0\0\x01ab")),
            Err(FrameError::TrailingBytes { extra: 1 })
        );
        assert!(matches!(
            unary_message(&Bytes::from_static(b"\0\xff\xff\xff\xff")),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(
            unary_message(&Bytes::from_static(b"\0\0\0\0\0"))
                .expect("empty")
                .len(),
            0
        );
    }

    #[test]
    fn grpc_message_encoding() {
        assert_eq!(
            percent_encode("denied: 100% sure\n"),
            "denied: 100%25 sure%0A"
        );
    }

    #[test]
    fn error_response_is_trailers_only() {
        let response = error_response(Code::PermissionDenied, "no");
        assert_eq!(status_of(response.headers(), None), Some(7));
        assert_eq!(response.headers()["grpc-message"], "no");
    }
}
