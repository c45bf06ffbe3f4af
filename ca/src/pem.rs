//! Minimal PEM (RFC 7468) encoding and decoding.
//!
//! Written here rather than borrowed so that private keys can be decoded
//! straight into zeroize-on-drop buffers of the right size, with no
//! intermediate copies left behind on the heap.

use zeroize::Zeroizing;

use crate::error::CaError;

/// PEM label of certificates.
pub(crate) const CERTIFICATE: &str = "CERTIFICATE";
/// PEM label of PKCS#8 private keys.
pub(crate) const PRIVATE_KEY: &str = "PRIVATE KEY";

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
/// Input bytes per 64-character output line.
const BYTES_PER_LINE: usize = 48;

/// Exact length of `encode_into`'s output.
pub(crate) fn encoded_len(label: &str, der_len: usize) -> usize {
    let begin = "-----BEGIN ".len() + label.len() + "-----\n".len();
    let end = "-----END ".len() + label.len() + "-----\n".len();
    let chars = der_len.div_ceil(3) * 4;
    let lines = der_len.div_ceil(BYTES_PER_LINE);
    begin + chars + lines + end
}

/// Appends one PEM block (LF line endings, 64-column base64) to `out`.
pub(crate) fn encode_into(out: &mut String, label: &str, der: &[u8]) {
    out.reserve(encoded_len(label, der.len()));
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for line in der.chunks(BYTES_PER_LINE) {
        for group in line.chunks(3) {
            let b0 = group[0];
            let b1 = group.get(1).copied().unwrap_or(0);
            let b2 = group.get(2).copied().unwrap_or(0);
            let n = (u32::from(b0) << 16) | (u32::from(b1) << 8) | u32::from(b2);
            out.push(char::from(ALPHABET[(n >> 18) as usize & 63]));
            out.push(char::from(ALPHABET[(n >> 12) as usize & 63]));
            out.push(if group.len() > 1 {
                char::from(ALPHABET[(n >> 6) as usize & 63])
            } else {
                '='
            });
            out.push(if group.len() > 2 {
                char::from(ALPHABET[n as usize & 63])
            } else {
                '='
            });
        }
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
}

/// A PKCS#8 private key as PEM, in a buffer that is wiped on drop and never
/// reallocated while being written.
pub(crate) fn encode_secret(label: &str, der: &[u8]) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(encoded_len(label, der.len())));
    encode_into(&mut out, label, der);
    out
}

/// One `-----BEGIN x-----` … `-----END x-----` block, not yet decoded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Block<'a> {
    pub(crate) label: &'a str,
    body: &'a str,
}

impl Block<'_> {
    /// Decodes the base64 body.
    pub(crate) fn decode(&self) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(self.body.len() / 4 * 3 + 3);
        decode_base64(self.body, &mut out)?;
        Ok(out)
    }

    /// Decodes the base64 body into a buffer that is wiped on drop.
    pub(crate) fn decode_secret(&self) -> Result<Zeroizing<Vec<u8>>, String> {
        // Sized up front so the buffer never reallocates (which would leave
        // an unwiped copy behind).
        let mut out = Zeroizing::new(Vec::with_capacity(self.body.len() / 4 * 3 + 3));
        decode_base64(self.body, &mut out)?;
        Ok(out)
    }
}

/// Splits PEM text into blocks. Text outside blocks is ignored, as RFC 7468
/// allows; a block without its END line, or with a mismatched END line, is an
/// error.
pub(crate) fn blocks(text: &str) -> Result<Vec<Block<'_>>, String> {
    let mut found = Vec::new();
    let mut open: Option<(&str, usize)> = None;
    let mut offset = 0;
    for raw_line in text.split_inclusive('\n') {
        let line_start = offset;
        offset += raw_line.len();
        let line = raw_line.trim();
        match open {
            None => {
                if let Some(rest) = line.strip_prefix("-----BEGIN ") {
                    let label = rest
                        .strip_suffix("-----")
                        .ok_or_else(|| format!("malformed BEGIN line {line:?}"))?;
                    open = Some((label, offset));
                }
            }
            Some((label, body_start)) => {
                if let Some(rest) = line.strip_prefix("-----END ") {
                    if rest.strip_suffix("-----") != Some(label) {
                        return Err(format!("block \"BEGIN {label}\" is closed by {line:?}"));
                    }
                    found.push(Block {
                        label,
                        body: &text[body_start..line_start],
                    });
                    open = None;
                } else if line.starts_with("-----") {
                    return Err(format!("unexpected line {line:?} inside block \"{label}\""));
                }
            }
        }
    }
    if let Some((label, _)) = open {
        return Err(format!("block \"{label}\" has no END line"));
    }
    Ok(found)
}

/// DER of every CERTIFICATE block in `text`; at least one is required, and
/// blocks with other labels are refused (a key in a certificate file is a
/// mistake worth reporting).
pub(crate) fn certificates(text: &str, what: &'static str) -> Result<Vec<Vec<u8>>, CaError> {
    let pem_err = |reason: String| CaError::Pem { what, reason };
    let blocks = blocks(text).map_err(pem_err)?;
    if blocks.is_empty() {
        return Err(pem_err("no CERTIFICATE block found".to_owned()));
    }
    blocks
        .iter()
        .enumerate()
        .map(|(index, block)| {
            if block.label != CERTIFICATE {
                return Err(pem_err(format!(
                    "block #{} is labelled {:?}, expected \"{CERTIFICATE}\"",
                    index + 1,
                    block.label
                )));
            }
            block
                .decode()
                .map_err(|reason| pem_err(format!("block #{}: {reason}", index + 1)))
        })
        .collect()
}

/// DER of the first CERTIFICATE block in `text`.
pub(crate) fn first_certificate(text: &str, what: &'static str) -> Result<Vec<u8>, CaError> {
    let pem_err = |reason: String| CaError::Pem { what, reason };
    let blocks = blocks(text).map_err(pem_err)?;
    let first = blocks
        .first()
        .ok_or_else(|| pem_err("no CERTIFICATE block found".to_owned()))?;
    if first.label != CERTIFICATE {
        return Err(pem_err(format!(
            "first block is labelled {:?}, expected \"{CERTIFICATE}\"",
            first.label
        )));
    }
    first.decode().map_err(pem_err)
}

fn sextet(c: u8) -> Option<u32> {
    let v = match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    };
    Some(u32::from(v))
}

/// Standard base64 with padding; ASCII whitespace is skipped.
fn decode_base64(body: &str, out: &mut Vec<u8>) -> Result<(), String> {
    let mut acc: u32 = 0;
    let mut pending = 0usize;
    let mut padding = 0usize;
    for &c in body.as_bytes() {
        if c.is_ascii_whitespace() {
            continue;
        }
        if c == b'=' {
            padding += 1;
            if padding > 2 {
                return Err("too much base64 padding".to_owned());
            }
            continue;
        }
        if padding > 0 {
            return Err("base64 data after padding".to_owned());
        }
        let Some(v) = sextet(c) else {
            return Err(if c == b':' {
                "PEM headers are not supported (is the key encrypted?)".to_owned()
            } else {
                format!("invalid base64 character {:?}", char::from(c))
            });
        };
        acc = (acc << 6) | v;
        pending += 1;
        if pending == 4 {
            out.extend_from_slice(&[(acc >> 16) as u8, (acc >> 8) as u8, acc as u8]);
            acc = 0;
            pending = 0;
        }
    }
    match (pending, padding) {
        (0, 0) => {}
        (2, 2) => out.push((acc >> 4) as u8),
        (3, 1) => out.extend_from_slice(&[(acc >> 10) as u8, (acc >> 2) as u8]),
        _ => return Err("truncated base64 data".to_owned()),
    }
    if out.is_empty() {
        return Err("empty block".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_length() {
        for len in 0..200usize {
            let der: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let mut text = String::new();
            encode_into(&mut text, "THING", &der);
            assert_eq!(text.len(), encoded_len("THING", len));
            assert!(
                text.lines()
                    .all(|l| l.len() <= 64 || l.starts_with("-----"))
            );
            let found = blocks(&text).unwrap();
            assert_eq!(found.len(), 1);
            assert_eq!(found[0].label, "THING");
            if len == 0 {
                assert!(found[0].decode().is_err());
            } else {
                assert_eq!(found[0].decode().unwrap(), der);
                assert_eq!(*found[0].decode_secret().unwrap(), der);
            }
        }
    }

    #[test]
    fn known_vector_and_crlf_and_surrounding_text() {
        let text = "comment\r\n-----BEGIN X-----\r\nZm9v\r\nYmE=\r\n-----END X-----\r\ntrailer\n";
        let found = blocks(text).unwrap();
        assert_eq!(found[0].decode().unwrap(), b"fooba");
    }

    #[test]
    fn rejects_bad_input() {
        assert!(blocks("-----BEGIN X-----\nAAAA\n").is_err());
        assert!(blocks("-----BEGIN X-----\nAAAA\n-----END Y-----\n").is_err());
        for body in ["AA=A", "AAA", "A===", "AA*A", "Proc-Type: 4,ENCRYPTED"] {
            let text = format!("-----BEGIN X-----\n{body}\n-----END X-----\n");
            let found = blocks(&text).unwrap();
            assert!(found[0].decode().is_err(), "{body}");
        }
        assert!(certificates("", "test").is_err());
        assert!(
            certificates(
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                "test"
            )
            .is_err()
        );
    }
}
