//! Fuzzes the image guard's reading of a registry token endpoint's answers
//! (`registry::parse_token` on a 200, `registry::error_text` on anything
//! else): no panics; a token is non-empty, bounded, header-safe and
//! survives a JSON round trip; errors never quote the answer; quoted text
//! is bounded, has no control characters and never shows a secret.
//!
//! Input format: the answer body, then up to two secrets (the credential's
//! password or token), separated by 0xFF.
#![no_main]

use credlet_imageguard::registry::{MAX_QUOTED, MAX_TOKEN_LEN, error_text, parse_token};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|b| *b == 0xFF);
    let body = parts.next().unwrap_or_default();
    let secrets: Vec<String> = parts
        .take(2)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();

    match parse_token(body) {
        Ok(token) => {
            assert!(!token.is_empty() && token.len() <= MAX_TOKEN_LEN);
            assert!(token.bytes().all(|b| b.is_ascii_graphic()));
            let again = serde_json::json!({ "token": token.as_str() }).to_string();
            assert_eq!(
                parse_token(again.as_bytes()).expect("re-parses").as_str(),
                token.as_str()
            );
        }
        // Fixed words and a number: never the body.
        Err(e) => assert!(e.len() < 80 && e.is_ascii(), "{e}"),
    }

    let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
    let text = error_text(body, &refs);
    assert!(!text.chars().any(char::is_control), "{text:?}");
    // A cut happens once the text reaches MAX_QUOTED: at most one more
    // character or escape (`\u{9f}`), then `…`.
    assert!(text.len() <= MAX_QUOTED + 6 + 3, "{}", text.len());
    for secret in &secrets {
        // Redaction is textual: a secret can reappear only from pieces of
        // `[redacted]` or of an escape (`\n` then `ext`), which these
        // conditions rule out.
        let plain = secret.len() >= 4
            && secret.bytes().all(|b| b.is_ascii_alphanumeric())
            && !"[redacted]".contains(secret.as_str())
            && !secret.starts_with(['n', 'r', 't']);
        if plain {
            assert!(!text.contains(secret.as_str()), "{secret:?} in {text:?}");
        }
    }
});
