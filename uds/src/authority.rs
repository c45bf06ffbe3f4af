//! Makes the `:authority` of requests arriving on a Unix socket acceptable
//! to h2.
//!
//! grpc-go without a `unix:` scheme (the kubelet's plugin registration
//! client, in 1.35 still) and gRPC C-core (Python, C++) send the socket's
//! percent-encoded path as `:authority`. `h2`'s server checks it against
//! `http::uri::Authority`, which refuses a percent-encoded host, and resets
//! every such stream with PROTOCOL_ERROR, while Go servers (containerd,
//! node-driver-registrar) accept it. On a Unix socket the authority means
//! nothing, so [`Rewriter`] replaces an unacceptable one with `localhost`
//! before h2 parses the request.
//!
//! It reads the client's HTTP/2 frames: everything but header blocks
//! passes unchanged. A header block (HEADERS and its CONTINUATIONs) is
//! decoded with the client's HPACK context and encoded again as
//! never-indexed literals, so the server's decoder keeps an empty dynamic
//! table and never sees an index into the client's. Nothing is written to
//! the client. No crate does this: h2 has no switch for it (hyperium/h2
//! #487, open), so the frames are read here; HPACK decoding is
//! `loona-hpack`'s.

use std::borrow::Cow;

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame every HTTP/2 server accepts (the floor of
/// SETTINGS_MAX_FRAME_SIZE): header blocks are re-framed to it.
const MAX_FRAME: usize = 16_384;
/// The most bytes one header block may take, compressed or decoded; h2's
/// own default limit on a decoded header list is 16 KiB per field plus
/// 16 MiB in all, far above any gRPC client's metadata.
pub const MAX_HEADER_BLOCK: usize = 1 << 20;
/// The dynamic table size the server advertises (the HTTP/2 default; h2
/// does not change it), which bounds the client's table updates.
const TABLE_SIZE: usize = 4096;
/// What an unacceptable authority becomes.
const LOCALHOST: &[u8] = b"localhost";

/// Why a client's bytes can not be passed on; the connection is closed,
/// as the server itself would (a connection error).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The connection does not start with the HTTP/2 preface.
    #[error("not an HTTP/2 client: the connection preface is missing")]
    Preface,
    /// A CONTINUATION frame without a header block to continue, or another
    /// frame in the middle of one (RFC 9113 §6.10).
    #[error("frame of type {frame_type} on stream {stream} inside a header block")]
    Interleaved {
        /// Frame type.
        frame_type: u8,
        /// Its stream.
        stream: u32,
    },
    /// Padding longer than the frame.
    #[error("HEADERS frame on stream {stream}: padding longer than the frame")]
    Padding {
        /// Its stream.
        stream: u32,
    },
    /// A header block beyond [`MAX_HEADER_BLOCK`].
    #[error("header block on stream {stream} over {MAX_HEADER_BLOCK} bytes")]
    TooLarge {
        /// Its stream.
        stream: u32,
    },
    /// HPACK decoding failed (a compression error).
    #[error("header block on stream {stream} does not decode: {reason}")]
    Hpack {
        /// Its stream.
        stream: u32,
        /// The decoder's reason.
        reason: String,
    },
}

#[derive(Debug)]
enum State {
    /// How much of the preface has been seen.
    Preface(usize),
    /// Gathering a frame header.
    FrameHeader,
    /// Passing this many payload bytes of a frame on unchanged.
    Pass(usize),
    /// Gathering a HEADERS or CONTINUATION payload of this many more bytes.
    Collect(usize),
    /// An error was returned; nothing more is accepted.
    Failed,
}

/// A header block being gathered.
#[derive(Debug)]
struct Block {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// The sans-IO core: client bytes in, bytes for the server out. See the
/// module documentation.
pub struct Rewriter {
    state: State,
    /// The frame header being gathered, then the current frame's.
    header: [u8; FRAME_HEADER],
    header_len: usize,
    /// The payload of the HEADERS/CONTINUATION frame being gathered.
    payload: Vec<u8>,
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
}

impl std::fmt::Debug for Rewriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewriter")
            .field("state", &self.state)
            .field("block", &self.block.as_ref().map(|b| b.stream))
            .finish_non_exhaustive()
    }
}

impl Default for Rewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Rewriter {
    /// A rewriter for a new connection.
    pub fn new() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        Self {
            state: State::Preface(0),
            header: [0; FRAME_HEADER],
            header_len: 0,
            payload: Vec::new(),
            block: None,
            decoder,
        }
    }

    /// Consumes all of `input` (the client's next bytes, split anywhere)
    /// and appends what the server should read to `out`.
    pub fn process(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
        while !input.is_empty() {
            match self.state {
                State::Failed => return Err(Error::Preface),
                State::Preface(seen) => {
                    let n = input.len().min(PREFACE.len() - seen);
                    if input[..n] != PREFACE[seen..seen + n] {
                        self.state = State::Failed;
                        return Err(Error::Preface);
                    }
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.state = if seen + n == PREFACE.len() {
                        State::FrameHeader
                    } else {
                        State::Preface(seen + n)
                    };
                }
                State::FrameHeader => {
                    let n = input.len().min(FRAME_HEADER - self.header_len);
                    self.header[self.header_len..self.header_len + n].copy_from_slice(&input[..n]);
                    self.header_len += n;
                    input = &input[n..];
                    if self.header_len == FRAME_HEADER {
                        self.header_len = 0;
                        if let Err(e) = self.start_frame(out) {
                            self.state = State::Failed;
                            return Err(e);
                        }
                    }
                }
                State::Pass(left) => {
                    let n = input.len().min(left);
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.state = if n == left {
                        State::FrameHeader
                    } else {
                        State::Pass(left - n)
                    };
                }
                State::Collect(left) => {
                    let n = input.len().min(left);
                    self.payload.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if n == left {
                        self.state = State::FrameHeader;
                        if let Err(e) = self.end_header_frame(out) {
                            self.state = State::Failed;
                            return Err(e);
                        }
                    } else {
                        self.state = State::Collect(left - n);
                    }
                }
            }
        }
        Ok(())
    }

    fn frame_len(&self) -> usize {
        usize::from(self.header[0]) << 16
            | usize::from(self.header[1]) << 8
            | usize::from(self.header[2])
    }

    fn frame_stream(&self) -> u32 {
        u32::from_be_bytes([
            self.header[5],
            self.header[6],
            self.header[7],
            self.header[8],
        ]) & 0x7fff_ffff
    }

    /// A frame header is complete: decide how its payload travels.
    fn start_frame(&mut self, out: &mut Vec<u8>) -> Result<(), Error> {
        let len = self.frame_len();
        let frame_type = self.header[3];
        let stream = self.frame_stream();
        let in_block = self.block.is_some();
        match frame_type {
            HEADERS if !in_block => {}
            CONTINUATION if in_block && self.block.as_ref().is_some_and(|b| b.stream == stream) => {
            }
            _ if in_block || frame_type == CONTINUATION => {
                return Err(Error::Interleaved { frame_type, stream });
            }
            _ => {
                out.extend_from_slice(&self.header);
                self.state = if len == 0 {
                    State::FrameHeader
                } else {
                    State::Pass(len)
                };
                return Ok(());
            }
        }
        let gathered = self.block.as_ref().map_or(0, |b| b.fragment.len());
        if gathered + len > MAX_HEADER_BLOCK {
            return Err(Error::TooLarge { stream });
        }
        self.payload.clear();
        if len == 0 {
            return self.end_header_frame(out);
        }
        self.state = State::Collect(len);
        Ok(())
    }

    /// A HEADERS or CONTINUATION payload is complete.
    fn end_header_frame(&mut self, out: &mut Vec<u8>) -> Result<(), Error> {
        let flags = self.header[4];
        let stream = self.frame_stream();
        let payload = std::mem::take(&mut self.payload);
        if self.header[3] == HEADERS {
            let mut rest = payload.as_slice();
            let mut pad = 0;
            if flags & PADDED != 0 {
                let (&p, r) = rest.split_first().ok_or(Error::Padding { stream })?;
                pad = usize::from(p);
                rest = r;
            }
            let priority = if flags & PRIORITY != 0 {
                if rest.len() < 5 {
                    return Err(Error::Padding { stream });
                }
                let (p, r) = rest.split_at(5);
                rest = r;
                Some([p[0], p[1], p[2], p[3], p[4]])
            } else {
                None
            };
            if pad > rest.len() {
                return Err(Error::Padding { stream });
            }
            self.block = Some(Block {
                stream,
                end_stream: flags & END_STREAM != 0,
                priority,
                fragment: rest[..rest.len() - pad].to_vec(),
            });
        } else if let Some(b) = self.block.as_mut() {
            b.fragment.extend_from_slice(&payload);
        }
        self.payload = payload;
        self.payload.clear();
        if flags & END_HEADERS != 0
            && let Some(block) = self.block.take()
        {
            self.emit(block, out)?;
        }
        Ok(())
    }

    /// Decodes a complete header block and writes it as HEADERS (and
    /// CONTINUATION) frames of never-indexed literals.
    fn emit(&mut self, block: Block, out: &mut Vec<u8>) -> Result<(), Error> {
        let stream = block.stream;
        let mut encoded = Vec::with_capacity(block.fragment.len() * 2 + 32);
        let mut too_large = false;
        self.decoder
            .decode_with_cb(
                &block.fragment,
                |name: Cow<'_, [u8]>, value: Cow<'_, [u8]>| {
                    if too_large {
                        return;
                    }
                    let value: &[u8] = if &*name == b":authority" && !acceptable(&value) {
                        LOCALHOST
                    } else {
                        &value
                    };
                    literal(&mut encoded, &name, value);
                    too_large = encoded.len() > MAX_HEADER_BLOCK;
                },
            )
            .map_err(|e| Error::Hpack {
                stream,
                reason: format!("{e:?}"),
            })?;
        if too_large {
            return Err(Error::TooLarge { stream });
        }

        let prefix = block.priority.map_or(0, |p| p.len());
        let first = encoded.len().min(MAX_FRAME - prefix);
        let mut flags = if block.end_stream { END_STREAM } else { 0 };
        if block.priority.is_some() {
            flags |= PRIORITY;
        }
        if first == encoded.len() {
            flags |= END_HEADERS;
        }
        frame_header(out, prefix + first, HEADERS, flags, stream);
        if let Some(p) = block.priority {
            out.extend_from_slice(&p);
        }
        out.extend_from_slice(&encoded[..first]);
        let mut rest = &encoded[first..];
        while !rest.is_empty() {
            let n = rest.len().min(MAX_FRAME);
            let flags = if n == rest.len() { END_HEADERS } else { 0 };
            frame_header(out, n, CONTINUATION, flags, stream);
            out.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
        }
        Ok(())
    }
}

/// Whether h2 takes `value` as an `:authority`.
pub fn acceptable(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

fn frame_header(out: &mut Vec<u8>, len: usize, frame_type: u8, flags: u8, stream: u32) {
    let len = len as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(frame_type);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// HPACK §6.2.3: literal header field never indexed, new name, no Huffman.
fn literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x10);
    integer(out, 7, name.len());
    out.extend_from_slice(name);
    integer(out, 7, value.len());
    out.extend_from_slice(value);
}

/// HPACK §5.1: an integer with an N-bit prefix (the prefix's high bits,
/// the Huffman flag here, stay 0).
fn integer(out: &mut Vec<u8>, prefix_bits: u32, mut value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(value as u8);
        return;
    }
    out.push(max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128 + 128) as u8);
        value /= 128;
    }
    out.push(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBELET_AUTHORITY: &[u8] =
        b"%2Fvar%2Flib%2Fkubelet%2Fplugins_registry%2Fcsi.credlet.io-reg.sock";

    fn headers_frame(out: &mut Vec<u8>, stream: u32, flags: u8, block: &[u8]) {
        frame_header(out, block.len(), HEADERS, flags, stream);
        out.extend_from_slice(block);
    }

    fn request(authority: &[u8], path: &str) -> Headers {
        vec![
            (b":method".to_vec(), b"POST".to_vec()),
            (b":scheme".to_vec(), b"http".to_vec()),
            (b":path".to_vec(), path.as_bytes().to_vec()),
            (b":authority".to_vec(), authority.to_vec()),
            (b"content-type".to_vec(), b"application/grpc".to_vec()),
            (b"te".to_vec(), b"trailers".to_vec()),
        ]
    }

    fn encode(enc: &mut loona_hpack::Encoder<'_>, headers: &Headers) -> Vec<u8> {
        enc.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
    }

    /// Parses what the server reads: frames after the preface, each header
    /// block decoded with a fresh server-side decoder.
    type Headers = Vec<(Vec<u8>, Vec<u8>)>;

    /// A frame as the server sees it: type, flags, stream, the decoded
    /// headers (a block's last frame), the payload (other frames).
    type Frame = (u8, u8, u32, Headers, Vec<u8>);

    fn server_view(bytes: &[u8]) -> Vec<Frame> {
        assert!(bytes.starts_with(PREFACE));
        let mut rest = &bytes[PREFACE.len()..];
        let mut dec = loona_hpack::Decoder::new();
        let mut frames = Vec::new();
        let mut block = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let (t, f) = (rest[3], rest[4]);
            let s = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            let payload = &rest[9..9 + len];
            rest = &rest[9 + len..];
            if t == HEADERS || t == CONTINUATION {
                let p = if t == HEADERS && f & PRIORITY != 0 {
                    &payload[5..]
                } else {
                    payload
                };
                block.extend_from_slice(p);
                if f & END_HEADERS != 0 {
                    let h = dec.decode(&block).expect("server decodes");
                    frames.push((t, f, s, h, Vec::new()));
                    block.clear();
                } else {
                    frames.push((t, f, s, Vec::new(), Vec::new()));
                }
            } else {
                frames.push((t, f, s, Vec::new(), payload.to_vec()));
            }
        }
        frames
    }

    fn client_bytes() -> Vec<u8> {
        let mut enc = loona_hpack::Encoder::new();
        let mut c = PREFACE.to_vec();
        // SETTINGS (empty), then three requests sharing the dynamic table:
        // the second and third refer to the first's entries by index.
        frame_header(&mut c, 0, 0x4, 0, 0);
        for (i, stream) in [1u32, 3, 5].into_iter().enumerate() {
            let h = request(
                KUBELET_AUTHORITY,
                &format!("/pluginregistration.Registration/GetInfo{i}"),
            );
            headers_frame(&mut c, stream, END_HEADERS, &encode(&mut enc, &h));
            // DATA with a gRPC message.
            frame_header(&mut c, 5, 0x0, END_STREAM, stream);
            c.extend_from_slice(&[0, 0, 0, 0, 0]);
        }
        c
    }

    #[test]
    fn path_authorities_become_localhost_in_every_request() {
        let client = client_bytes();
        let mut out = Vec::new();
        Rewriter::new().process(&client, &mut out).unwrap();
        let frames = server_view(&out);
        let headers: Vec<_> = frames.iter().filter(|f| f.0 == HEADERS).collect();
        assert_eq!(headers.len(), 3);
        for (i, h) in headers.iter().enumerate() {
            let path = format!("/pluginregistration.Registration/GetInfo{i}");
            assert_eq!(h.3, request(b"localhost", &path), "request {i}");
            assert_eq!(h.1, END_HEADERS);
        }
        // DATA frames unchanged, in order.
        let data: Vec<_> = frames
            .iter()
            .filter(|f| f.0 == 0)
            .map(|f| (f.1, f.2, f.4.clone()))
            .collect();
        assert_eq!(
            data,
            [
                (END_STREAM, 1, vec![0; 5]),
                (END_STREAM, 3, vec![0; 5]),
                (END_STREAM, 5, vec![0; 5])
            ]
        );
    }

    #[test]
    fn any_split_of_the_input_gives_the_same_output() {
        let client = client_bytes();
        let mut whole = Vec::new();
        Rewriter::new().process(&client, &mut whole).unwrap();
        for chunk in [1, 2, 3, 7, 9, 10, 64] {
            let mut r = Rewriter::new();
            let mut out = Vec::new();
            for piece in client.chunks(chunk) {
                r.process(piece, &mut out).unwrap();
            }
            assert_eq!(out, whole, "chunks of {chunk}");
        }
    }

    #[test]
    fn acceptable_authorities_stay() {
        for a in [
            &b"localhost"[..],
            b"127.0.0.1:8443",
            b"credlet-ca.credlet-system.svc:8443",
            b"[::1]:1",
        ] {
            assert!(acceptable(a));
            let mut enc = loona_hpack::Encoder::new();
            let mut c = PREFACE.to_vec();
            headers_frame(
                &mut c,
                1,
                END_HEADERS | END_STREAM,
                &encode(&mut enc, &request(a, "/x")),
            );
            let mut out = Vec::new();
            Rewriter::new().process(&c, &mut out).unwrap();
            let f = server_view(&out);
            assert_eq!(f[0].3, request(a, "/x"));
            assert_eq!(f[0].1, END_HEADERS | END_STREAM);
        }
        for a in [
            KUBELET_AUTHORITY,
            b"/run/containerd/containerd.sock",
            b"%2Fx",
        ] {
            assert!(!acceptable(a), "{:?}", String::from_utf8_lossy(a));
        }
    }

    #[test]
    fn padding_priority_and_continuation_are_taken_apart() {
        let mut enc = loona_hpack::Encoder::new();
        let block = encode(&mut enc, &request(KUBELET_AUTHORITY, "/a"));
        let (one, two) = block.split_at(block.len() / 2);
        let mut c = PREFACE.to_vec();
        // HEADERS: padded (3 bytes), with priority, END_STREAM, no END_HEADERS.
        let payload_len = 1 + 5 + one.len() + 3;
        frame_header(
            &mut c,
            payload_len,
            HEADERS,
            PADDED | PRIORITY | END_STREAM,
            7,
        );
        c.push(3);
        c.extend_from_slice(&[0x80, 0, 0, 1, 200]);
        c.extend_from_slice(one);
        c.extend_from_slice(&[0, 0, 0]);
        frame_header(&mut c, two.len(), CONTINUATION, END_HEADERS, 7);
        c.extend_from_slice(two);
        let mut out = Vec::new();
        Rewriter::new().process(&c, &mut out).unwrap();
        let f = server_view(&out);
        assert_eq!(f.len(), 1, "one HEADERS frame");
        assert_eq!(f[0].1, PRIORITY | END_STREAM | END_HEADERS);
        assert_eq!(f[0].3, request(b"localhost", "/a"));
        let prio = &out[PREFACE.len() + 9..PREFACE.len() + 14];
        assert_eq!(prio, [0x80, 0, 0, 1, 200]);
    }

    #[test]
    fn large_blocks_are_split_into_continuations() {
        let mut enc = loona_hpack::Encoder::new();
        let mut h = request(KUBELET_AUTHORITY, "/big");
        h.push((b"x-big".to_vec(), vec![b'a'; 40_000]));
        let mut c = PREFACE.to_vec();
        let block = encode(&mut enc, &h);
        // A client may send a block larger than 16 KiB only in pieces.
        let (a, b) = block.split_at(16_000);
        let (b, d) = b.split_at(16_000);
        frame_header(&mut c, a.len(), HEADERS, 0, 1);
        c.extend_from_slice(a);
        frame_header(&mut c, b.len(), CONTINUATION, 0, 1);
        c.extend_from_slice(b);
        frame_header(&mut c, d.len(), CONTINUATION, END_HEADERS, 1);
        c.extend_from_slice(d);
        let mut out = Vec::new();
        Rewriter::new().process(&c, &mut out).unwrap();
        let f = server_view(&out);
        assert!(f.len() >= 3);
        assert_eq!(f[0].0, HEADERS);
        assert!(f[1..].iter().all(|x| x.0 == CONTINUATION));
        let last = f.last().unwrap();
        assert_eq!(last.1, END_HEADERS);
        let mut expected = request(b"localhost", "/big");
        expected.push((b"x-big".to_vec(), vec![b'a'; 40_000]));
        assert_eq!(last.3, expected);
    }

    #[test]
    fn protocol_errors_close_the_connection() {
        let mut r = Rewriter::new();
        assert_eq!(
            r.process(b"GET / HTTP/1.1\r\n", &mut Vec::new()),
            Err(Error::Preface)
        );
        // Nothing is accepted after an error.
        assert!(r.process(PREFACE, &mut Vec::new()).is_err());

        // CONTINUATION without HEADERS.
        let mut c = PREFACE.to_vec();
        frame_header(&mut c, 1, CONTINUATION, END_HEADERS, 1);
        c.push(0x82);
        assert!(matches!(
            Rewriter::new().process(&c, &mut Vec::new()),
            Err(Error::Interleaved {
                frame_type: CONTINUATION,
                stream: 1
            })
        ));

        // DATA inside a header block.
        let mut c = PREFACE.to_vec();
        frame_header(&mut c, 1, HEADERS, 0, 1);
        c.push(0x82);
        frame_header(&mut c, 0, 0x0, 0, 1);
        assert!(matches!(
            Rewriter::new().process(&c, &mut Vec::new()),
            Err(Error::Interleaved {
                frame_type: 0,
                stream: 1
            })
        ));

        // Padding longer than the frame.
        let mut c = PREFACE.to_vec();
        frame_header(&mut c, 2, HEADERS, PADDED | END_HEADERS, 1);
        c.extend_from_slice(&[5, 0x82]);
        assert!(matches!(
            Rewriter::new().process(&c, &mut Vec::new()),
            Err(Error::Padding { stream: 1 })
        ));

        // Index 63: past the static table (61) and the empty dynamic one.
        let mut c = PREFACE.to_vec();
        frame_header(&mut c, 1, HEADERS, END_HEADERS, 1);
        c.push(0x80 | 63);
        assert!(matches!(
            Rewriter::new().process(&c, &mut Vec::new()),
            Err(Error::Hpack { stream: 1, .. })
        ));

        // A block over the limit, announced in pieces.
        let mut c = PREFACE.to_vec();
        let mut r = Rewriter::new();
        frame_header(&mut c, 16_384, HEADERS, 0, 1);
        c.extend_from_slice(&[0x82; 16_384]);
        r.process(&c, &mut Vec::new()).unwrap();
        let mut too_much = Ok(());
        for _ in 0..70 {
            let mut c = Vec::new();
            frame_header(&mut c, 16_384, CONTINUATION, 0, 1);
            c.extend_from_slice(&[0x82; 16_384]);
            too_much = r.process(&c, &mut Vec::new());
            if too_much.is_err() {
                break;
            }
        }
        assert_eq!(too_much, Err(Error::TooLarge { stream: 1 }));
    }

    #[test]
    fn decompression_bombs_are_refused() {
        // One 4 KB entry, then 16 KB of one-byte references to it: 64 MB
        // decoded from 16 KB.
        let mut enc = loona_hpack::Encoder::new();
        let big = vec![(b"x-a".to_vec(), vec![b'a'; 4000])];
        let mut block = encode(&mut enc, &big);
        let again = encode(&mut enc, &big);
        assert_eq!(again.len(), 1, "indexed");
        block.extend(std::iter::repeat_n(again[0], 16_000));
        let mut c = PREFACE.to_vec();
        headers_frame(&mut c, 1, END_HEADERS, &block);
        assert_eq!(
            Rewriter::new().process(&c, &mut Vec::new()),
            Err(Error::TooLarge { stream: 1 })
        );
    }

    #[test]
    fn integers_round_trip_through_the_decoder() {
        for n in [0usize, 1, 126, 127, 128, 255, 16_383, 16_384, 1 << 20] {
            let mut block = Vec::new();
            literal(&mut block, b"x-n", &vec![b'v'; n]);
            let h = loona_hpack::Decoder::new().decode(&block).unwrap();
            assert_eq!(h[0].1.len(), n);
        }
    }
}
