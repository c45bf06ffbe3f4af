//! One unary gRPC call written as raw HTTP/2 frames over a Unix socket,
//! with any `:authority`: what clients the tests can not build with tonic
//! send (grpc-go dialled with a bare socket path, gRPC C-core), which h2
//! servers refuse unless they are told to accept it.

use std::path::Path;

use anyhow::{Context, Result};

/// One unary gRPC call written frame by frame, with `authority` as the
/// `:authority`, the way grpc-go sends it when dialled with a bare socket
/// path (the kubelet's plugin-registration client, 1.35). Returns the
/// `grpc-status` and the response message.
pub async fn raw_unary_call(
    socket: &Path,
    authority: &str,
    method: &str,
    message: &[u8],
) -> Result<(String, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
    }
    let headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", method),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ];
    let block = loona_hpack::Encoder::new()
        .encode(headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
    let mut grpc = vec![0];
    grpc.extend_from_slice(&(message.len() as u32).to_be_bytes());
    grpc.extend_from_slice(message);
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 0x4, 0, 0, &[]);
    frame(&mut out, 0x1, 0x4, 1, &block);
    frame(&mut out, 0x0, 0x1, 1, &grpc);
    let mut conn = tokio::net::UnixStream::connect(socket).await?;
    conn.write_all(&out).await?;

    let mut decoder = loona_hpack::Decoder::new();
    let mut status = None;
    let mut body = Vec::new();
    loop {
        let mut head = [0u8; 9];
        conn.read_exact(&mut head)
            .await
            .context("the server closed the connection")?;
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let mut payload = vec![0; len];
        conn.read_exact(&mut payload).await?;
        match head[3] {
            // RST_STREAM: what h2 answers a malformed :authority with.
            0x3 => anyhow::bail!("stream reset with code {:?}", &payload),
            0x0 => body.extend_from_slice(&payload),
            0x1 => {
                for (name, value) in decoder
                    .decode(&payload)
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?
                {
                    if name == b"grpc-status" {
                        status = Some(String::from_utf8_lossy(&value).into_owned());
                    }
                }
                if head[4] & 0x1 != 0 {
                    break;
                }
            }
            _ => {}
        }
    }
    let message = body.get(5..).unwrap_or_default().to_vec();
    Ok((status.context("no grpc-status")?, message))
}
