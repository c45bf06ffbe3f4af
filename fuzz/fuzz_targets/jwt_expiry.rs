//! Fuzzes the CA service's reading of a JWT's `exp` claim (untrusted token
//! text from agents, read before the TokenReview): must never panic, and
//! must only answer for three-segment tokens.
#![no_main]

use credlet_ca_service::tokens::jwt_expiry;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = std::str::from_utf8(data)
        && jwt_expiry(token).is_some()
    {
        assert_eq!(token.split('.').count(), 3);
    }
});
