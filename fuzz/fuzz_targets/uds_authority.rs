//! Fuzzes credlet-uds's HTTP/2 `:authority` rewriter (`Rewriter::process`)
//! with arbitrary client bytes split at arbitrary points: it never panics,
//! every split of the same bytes gives the same output or the same error,
//! nothing is accepted after an error, and what it passes on is what the
//! server must see: header blocks that a fresh HPACK decoder (the server's,
//! whose table the rewriter never fills) decodes, and only `:authority`
//! values h2 accepts.
//!
//! Input: a flag byte (bit 0: the harness prepends the connection preface;
//! bits 1-4: how many split points follow), the split points as
//! little-endian u16 offsets (modulo the length), then the client's bytes.
#![no_main]

use credlet_uds::authority::{Rewriter, acceptable};
use libfuzzer_sys::fuzz_target;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Decodes the header blocks of the complete frames the server reads.
fn check_server_view(out: &[u8]) {
    let Some(mut rest) = out.strip_prefix(PREFACE) else {
        return assert!(PREFACE.starts_with(out));
    };
    let mut decoder = loona_hpack::Decoder::new();
    let mut block = Vec::new();
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        let (kind, flags) = (rest[3], rest[4]);
        let Some(payload) = rest.get(9..9 + len) else {
            return;
        };
        rest = &rest[9 + len..];
        if kind != 0x1 && kind != 0x9 {
            assert!(
                block.is_empty(),
                "frame {kind} inside a rewritten header block"
            );
            continue;
        }
        // Rewritten HEADERS: never padded, maybe a 5-byte priority.
        assert_eq!(flags & 0x8, 0);
        let fragment = if kind == 0x1 && flags & 0x20 != 0 {
            &payload[5..]
        } else {
            payload
        };
        block.extend_from_slice(fragment);
        if flags & 0x4 != 0 {
            let headers = decoder
                .decode(&block)
                .expect("the server decodes every block");
            for (name, value) in headers {
                if name == b":authority" {
                    assert!(acceptable(&value), "{:?}", String::from_utf8_lossy(&value));
                }
            }
            block.clear();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let splits = usize::from((flags >> 1) & 0xF);
    let (offsets, client) = rest.split_at((2 * splits).min(rest.len()));
    let mut input = Vec::new();
    if flags & 1 != 0 {
        input.extend_from_slice(PREFACE);
    }
    input.extend_from_slice(client);

    let mut whole = Vec::new();
    let expected = Rewriter::new().process(&input, &mut whole);

    let mut points: Vec<usize> = offsets
        .chunks_exact(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (input.len() + 1))
        .collect();
    points.sort_unstable();
    let mut rewriter = Rewriter::new();
    let mut out = Vec::new();
    let mut got = Ok(());
    let mut start = 0;
    for end in points.into_iter().chain([input.len()]) {
        got = rewriter.process(&input[start..end], &mut out);
        start = end;
        if got.is_err() {
            break;
        }
    }
    assert_eq!(got, expected);
    match got {
        Ok(()) => {
            assert_eq!(out, whole);
            check_server_view(&out);
        }
        Err(_) => assert!(rewriter.process(PREFACE, &mut Vec::new()).is_err()),
    }
});
