//! Fuzzes the kubelet's service account token map
//! (`csi.storage.k8s.io/serviceAccount.tokens`: JSON, audience →
//! `{token, expirationTimestamp}`) as `attributes::parse_token` reads it:
//! no panics, a token is never empty, `Debug` never depends on it, and an
//! error never quotes it.
//!
//! Input format: the audience, 0xFF, the map's JSON text.
#![no_main]

use std::collections::HashMap;

use credlet_csi::attributes::{SERVICE_ACCOUNT_TOKENS, ServiceAccountToken, parse_token};
use libfuzzer_sys::fuzz_target;
use zeroize::Zeroizing;

fuzz_target!(|data: &[u8]| {
    let (audience, map) = match data.iter().position(|b| *b == 0xFF) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"credlet"[..], data),
    };
    let audience = String::from_utf8_lossy(audience);
    let map = String::from_utf8_lossy(map).into_owned();
    let context = HashMap::from([(SERVICE_ACCOUNT_TOKENS.to_owned(), map.clone())]);
    match parse_token(&context, &audience) {
        Ok(None) => {}
        Ok(Some(token)) => {
            assert!(!token.token.is_empty());
            let other = ServiceAccountToken {
                token: Zeroizing::new("x".into()),
                expires: token.expires,
            };
            assert_eq!(format!("{token:?}"), format!("{other:?}"));
        }
        Err(error) => {
            // The message names a position, the audience or a timestamp,
            // never a token: JWT-like `token` strings of the map (with a
            // dot, which no fixed word has) stay out of it unless they are
            // part of the audience or of a timestamp.
            let message = error.to_string();
            let Ok(serde_json::Value::Object(entries)) = serde_json::from_str(&map) else {
                return;
            };
            let mut quotable = vec![format!("{audience:?}")];
            for entry in entries.values() {
                if let Some(ts) = entry.get("expirationTimestamp").and_then(|t| t.as_str()) {
                    quotable.push(format!("{ts:?}"));
                }
            }
            for entry in entries.values() {
                if let Some(t) = entry.get("token").and_then(|t| t.as_str())
                    && t.len() >= 8
                    && t.contains('.')
                    && !quotable.iter().any(|q| q.contains(t))
                {
                    assert!(!message.contains(t), "{message}");
                }
            }
        }
    }
});
