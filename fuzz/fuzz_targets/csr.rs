//! Fuzzes CSR parsing and proof-of-possession verification: the CA's input
//! from agents.
#![no_main]

use credlet_ca::VerifiedCsr;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(csr) = VerifiedCsr::from_der(data) {
        assert!(!csr.public_key_der().is_empty());
    }
});
