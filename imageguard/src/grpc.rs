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

/// Largest unary message the proxy buffers to inspect: the kubelet's own
/// CRI limit (its client and the runtimes' servers take messages of up to
/// 16 MiB). Most CRI requests are a few KiB, but a `CreateContainer` with
/// large environment variables, annotations or mounts can run to
/// megabytes, and anything the runtime would accept must pass.
pub const MAX_INSPECTED_MESSAGE: usize = 16 << 20;

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

/// Reads a unary request as its body arrives, into one buffer of the size
/// the 5-byte prefix announces: a message over [`MAX_INSPECTED_MESSAGE`]
/// is refused from its prefix, before the rest is read, and a message
/// within it costs one allocation of its own size (no second copy when the
/// body is complete).
///
/// The announced size is allocated up front: only the kubelet (root) can
/// reach the CRI socket, and it may send that much anyway.
#[derive(Debug, Default)]
pub struct UnaryReader {
    buf: BytesMut,
    /// Prefix and message length, once the prefix is in.
    expected: Option<usize>,
}

impl UnaryReader {
    /// A reader for one message.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the next piece of the body.
    pub fn push(&mut self, mut data: &[u8]) -> Result<(), FrameError> {
        let expected = match self.expected {
            Some(expected) => expected,
            None => {
                let take = (5 - self.buf.len()).min(data.len());
                self.buf.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.buf.len() < 5 {
                    return Ok(());
                }
                if self.buf[0] != 0 {
                    return Err(FrameError::Compressed);
                }
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if len > MAX_INSPECTED_MESSAGE {
                    return Err(FrameError::TooLarge {
                        len,
                        max: MAX_INSPECTED_MESSAGE,
                    });
                }
                let mut sized = BytesMut::with_capacity(5 + len);
                sized.extend_from_slice(&self.buf);
                self.buf = sized;
                self.expected = Some(5 + len);
                5 + len
            }
        };
        let end = self.buf.len() + data.len();
        if end > expected {
            return Err(FrameError::TrailingBytes {
                extra: end - expected,
            });
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// The framed body, once complete.
    pub fn finish(self) -> Result<Bytes, FrameError> {
        let body = self.buf.freeze();
        unary_message(&body)?;
        Ok(body)
    }
}

/// The deadline a gRPC caller gave its call (`grpc-timeout`: at most 8
/// digits and a unit, `H`, `M`, `S`, `m`, `u` or `n`); `None` if it gave
/// none or an unreadable one, which gRPC servers also take as none.
pub fn grpc_timeout(headers: &HeaderMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The messages of a streamed body (a server-streaming answer read whole),
/// each at most [`MAX_INSPECTED_MESSAGE`] bytes.
pub fn stream_messages(body: &Bytes) -> Result<Vec<Bytes>, FrameError> {
    let mut messages = Vec::new();
    let mut rest = body.clone();
    while !rest.is_empty() {
        if rest.len() < 5 {
            return Err(FrameError::Truncated {
                len: rest.len(),
                expected: 5,
            });
        }
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let end = 5usize.saturating_add(len).min(rest.len().max(5));
        let frame = rest.slice(..end);
        messages.push(unary_message(&frame)?);
        rest = rest.slice(end..);
    }
    Ok(messages)
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
    /// 8
    ResourceExhausted = 8,
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
    status_response(u32::from(code as u8), message)
}

/// A trailers-only response with any gRPC status code (a runtime's, passed
/// on).
pub fn status_response(code: u32, message: &str) -> Response<ProxyBody> {
    let mut response = Response::new(
        http_body_util::Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    let headers = response.headers_mut();
    grpc_headers(headers);
    headers.insert("grpc-status", HeaderValue::from(code));
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

/// Decodes a percent-encoded grpc-message (invalid escapes stay as they
/// are; invalid UTF-8 is replaced).
pub fn percent_decode(message: &str) -> String {
    let b = message.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| char::from(c).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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
///
/// A trailers-only answer (no data, no trailers: the gRPC status is in
/// the headers, as runtimes send most errors) is replayed as one: a body
/// that is empty from the start, so the headers go out with END_STREAM.
/// A body that only turns out empty later would send the headers on their
/// own and then end the stream with an empty DATA frame; gRPC clients
/// (grpc-go: the kubelet, critest) then read the status headers as mere
/// headers and report `Internal: server closed the stream without sending
/// trailers` instead of the runtime's status.
pub fn replay_body(data: Bytes, trailers: Option<HeaderMap>) -> ProxyBody {
    if data.is_empty() && trailers.is_none() {
        return http_body_util::Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed();
    }
    BodyExt::boxed(http_body_util::StreamBody::new(TwoFrames {
        data: (!data.is_empty()).then_some(data),
        trailers,
    }))
}

#[cfg(test)]
mod tests {
    use credlet_proto::cri::PullImageResponse;
    use prost::Message;

    use super::*;

    /// The frames `body` yields, and whether it said it had ended before
    /// the first (what makes hyper end the stream with the headers).
    fn replayed(body: ProxyBody) -> (bool, Vec<http_body::Frame<Bytes>>) {
        let ended_at_once = http_body::Body::is_end_stream(&body);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let frames = rt.block_on(async move {
            let mut body = body;
            let mut frames = Vec::new();
            while let Some(frame) = body.frame().await {
                frames.push(frame.expect("frame"));
            }
            frames
        });
        (ended_at_once, frames)
    }

    #[test]
    fn trailers_only_answers_are_replayed_as_trailers_only() {
        // containerd's errors: status in the headers, nothing after them.
        let (ended_at_once, frames) = replayed(replay_body(Bytes::new(), None));
        assert!(ended_at_once, "the headers must carry END_STREAM");
        assert!(frames.is_empty());

        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from(0u32));
        let (ended_at_once, frames) = replayed(replay_body(
            Bytes::from_static(b"\0\0\0\0\0"),
            Some(trailers.clone()),
        ));
        assert!(!ended_at_once);
        assert_eq!(frames.len(), 2);
        assert_eq!(
            frames[0].data_ref().map(|d| d.as_ref()),
            Some(&b"\0\0\0\0\0"[..])
        );
        assert_eq!(frames[1].trailers_ref(), Some(&trailers));

        // No empty DATA frame before trailers.
        let (ended_at_once, frames) = replayed(replay_body(Bytes::new(), Some(trailers.clone())));
        assert!(!ended_at_once);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].trailers_ref(), Some(&trailers));
    }

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
    fn messages_are_read_as_they_arrive() {
        let message = PullImageResponse {
            image_ref: "sha256:abc".into(),
        };
        let framed = frame(&message);
        // Whole, byte by byte, and in two pieces split inside the prefix.
        let mut whole = UnaryReader::new();
        whole.push(&framed).expect("whole");
        assert_eq!(whole.finish().expect("finish"), framed);
        let mut bytewise = UnaryReader::new();
        for b in framed.iter() {
            bytewise.push(&[*b]).expect("byte");
        }
        assert_eq!(bytewise.finish().expect("finish"), framed);
        let mut split = UnaryReader::new();
        split.push(&framed[..3]).expect("head");
        split.push(&framed[3..]).expect("rest");
        assert_eq!(split.finish().expect("finish"), framed);

        let over = u32::try_from(MAX_INSPECTED_MESSAGE + 1).expect("u32");
        let mut oversized = vec![0u8];
        oversized.extend_from_slice(&over.to_be_bytes());
        let at_limit = u32::try_from(MAX_INSPECTED_MESSAGE).expect("u32");
        let mut limit_prefix = vec![0u8];
        limit_prefix.extend_from_slice(&at_limit.to_be_bytes());
        // (the body in pieces, what the reader says)
        type Case<'a> = (Vec<&'a [u8]>, Result<(), FrameError>);
        let table: Vec<Case<'_>> = vec![
            (
                vec![&oversized],
                Err(FrameError::TooLarge {
                    len: MAX_INSPECTED_MESSAGE + 1,
                    max: MAX_INSPECTED_MESSAGE,
                }),
            ),
            // Refused from the prefix alone: nothing more is read.
            (
                vec![&oversized[..3], &oversized[3..]],
                Err(FrameError::TooLarge {
                    len: MAX_INSPECTED_MESSAGE + 1,
                    max: MAX_INSPECTED_MESSAGE,
                }),
            ),
            (vec![b"\x01\0\0\0\x01x"], Err(FrameError::Compressed)),
            (
                vec![b"\0\0\0\0\x01", b"ab"],
                Err(FrameError::TrailingBytes { extra: 1 }),
            ),
            (
                vec![b"\0\0\0\0\x02", b"a"],
                Err(FrameError::Truncated {
                    len: 6,
                    expected: 7,
                }),
            ),
            (
                vec![b"\0\0"],
                Err(FrameError::Truncated {
                    len: 2,
                    expected: 5,
                }),
            ),
            (vec![b"\0\0\0\0\0"], Ok(())),
            // A message of exactly the limit is taken (its prefix at least).
            (
                vec![&limit_prefix],
                Err(FrameError::Truncated {
                    len: 5,
                    expected: 5 + MAX_INSPECTED_MESSAGE,
                }),
            ),
        ];
        for (pieces, want) in table {
            let mut reader = UnaryReader::new();
            let got = pieces
                .iter()
                .try_for_each(|p| reader.push(p))
                .and_then(|()| reader.finish().map(|_| ()));
            assert_eq!(got, want, "{pieces:?}");
        }
    }

    #[test]
    fn grpc_timeouts() {
        use std::time::Duration;
        let table = [
            ("120S", Some(Duration::from_secs(120))),
            ("2M", Some(Duration::from_secs(120))),
            ("1H", Some(Duration::from_secs(3600))),
            ("250m", Some(Duration::from_millis(250))),
            ("7u", Some(Duration::from_micros(7))),
            ("99999999n", Some(Duration::from_nanos(99_999_999))),
            ("0S", Some(Duration::ZERO)),
            ("123456789S", None),
            ("S", None),
            ("12", None),
            ("1.5S", None),
            ("-1S", None),
            ("10s", None),
            ("", None),
        ];
        for (value, want) in table {
            let mut headers = HeaderMap::new();
            headers.insert("grpc-timeout", HeaderValue::from_str(value).expect("value"));
            assert_eq!(grpc_timeout(&headers), want, "{value:?}");
        }
        assert_eq!(grpc_timeout(&HeaderMap::new()), None);
    }

    #[test]
    fn streamed_messages() {
        let one = PullImageResponse {
            image_ref: "sha256:abc".into(),
        };
        let two = PullImageResponse::default();
        let mut body = frame(&one).to_vec();
        body.extend_from_slice(&frame(&two));
        let messages = stream_messages(&Bytes::from(body.clone())).expect("two");
        assert_eq!(messages.len(), 2);
        assert_eq!(
            PullImageResponse::decode(messages[0].clone()).expect("one"),
            one
        );
        assert!(stream_messages(&Bytes::new()).expect("none").is_empty());
        body.pop();
        assert!(stream_messages(&Bytes::from(body)).is_err());
    }

    #[test]
    fn grpc_message_encoding() {
        assert_eq!(
            percent_encode("denied: 100% sure\n"),
            "denied: 100%25 sure%0A"
        );
    }

    #[test]
    fn grpc_message_decoding() {
        for message in ["denied: 100% sure\n", "plain", "%", "é", ""] {
            assert_eq!(percent_decode(&percent_encode(message)), message);
        }
        assert_eq!(percent_decode("bad %zz %4"), "bad %zz %4");
    }

    #[test]
    fn error_response_is_trailers_only() {
        let response = error_response(Code::PermissionDenied, "no");
        assert_eq!(status_of(response.headers(), None), Some(7));
        assert_eq!(response.headers()["grpc-message"], "no");
    }
}
