//! Fuzzes `Credential::from_auth_config` over arbitrary `AuthConfig`
//! fields: no panics, `Debug` never depends on secret content, and the
//! canonical encoding is self-delimiting.
//!
//! Input format: the six fields (username, password, auth, server_address,
//! identity_token, registry_token) separated by 0xFF.
#![no_main]

use credlet_imageguard::credential::Credential;
use credlet_proto::cri::AuthConfig;
use libfuzzer_sys::fuzz_target;

fn mask(s: &str) -> String {
    "x".repeat(s.len())
}

fuzz_target!(|data: &[u8]| {
    let mut fields = data
        .split(|b| *b == 0xFF)
        .map(|f| String::from_utf8_lossy(f).into_owned());
    let mut next = || fields.next().unwrap_or_default();
    let auth = AuthConfig {
        username: next(),
        password: next(),
        auth: next(),
        server_address: next(),
        identity_token: next(),
        registry_token: next(),
    };
    let result = Credential::from_auth_config(&auth);
    let Ok(Some(credential)) = result else {
        if let Err(e) = result {
            let _ = e.to_string();
        }
        return;
    };

    // Same structure with every (non-`auth`) secret replaced by x's of the
    // same length: Debug output must be identical.
    let masked = AuthConfig {
        password: mask(&auth.password),
        identity_token: mask(&auth.identity_token),
        registry_token: mask(&auth.registry_token),
        ..auth.clone()
    };
    let other = Credential::from_auth_config(&masked)
        .expect("masking keeps validity")
        .expect("masking keeps non-anonymous");
    assert_eq!(format!("{credential:?}"), format!("{other:?}"));
    assert_eq!(credential.kind(), other.kind());

    // Canonical bytes: tag, kind byte, two length-prefixed fields, nothing else.
    let bytes = credential.canonical_bytes();
    assert_eq!(*bytes, *credential.canonical_bytes());
    let rest = bytes
        .strip_prefix(b"credlet-credential-v1".as_slice())
        .expect("tag");
    let (&kind, mut rest) = rest.split_first().expect("kind");
    assert!((1..=3).contains(&kind));
    for _ in 0..2 {
        let (len, tail) = rest.split_at(4);
        let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
        rest = &tail[len..];
    }
    assert!(rest.is_empty());
    if let Some(user) = credential.username() {
        assert!(!user.chars().any(char::is_control));
    }
});
