//! Fuzzes the agent's reading of the CA's answers: an `IssuedCertificate`
//! through `remote::convert` (times), `credlet_ca::inspect_leaf` (the
//! chain, as for pod and agent certificates) and the renewal point chosen
//! from it (`schedule::renewal_time`), and a trust bundle through
//! `remote::has_certificate` and `ServerRoots::learn` / `ServerRoots::new`
//! (a bundle sent by the CA, and the saved one at start). No panics; times
//! come out ordered and after the epoch; a damaged bundle never makes the
//! configured roots unusable.
//!
//! Input: notBefore, notAfter (s) and renewAt (ms) as three little-endian
//! i64, a mode byte, then the chain and the bundle separated by 0xFF. Mode
//! bit 0 (bit 1): the chain (bundle) bytes are DER, wrapped in a PEM
//! CERTIFICATE block by the harness; else they are the PEM text itself.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use credlet_ca::{Authority, Policy, inspect_leaf};
use credlet_csi::attributes::RenewBefore;
use credlet_csi::remote::{ServerRoots, convert, has_certificate};
use credlet_csi::schedule::renewal_time;
use credlet_proto::ca::IssuedCertificate;
use libfuzzer_sys::fuzz_target;

fn configured() -> &'static (String, ServerRoots) {
    static ROOTS: OnceLock<(String, ServerRoots)> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let ca = Authority::generate_self_signed(Policy::new("cluster.local")).unwrap();
        let pem = ca.trust_bundle_pem().to_owned();
        let roots = ServerRoots::new(&pem, "", "cluster.local", "https://ca:443").unwrap();
        (pem, roots)
    })
}

fn pem(bytes: &[u8], der: bool) -> String {
    if !der {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    let b64 = STANDARD.encode(bytes);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

fuzz_target!(|data: &[u8]| {
    let mut head = [0u8; 25];
    let n = data.len().min(25);
    head[..n].copy_from_slice(&data[..n]);
    let int = |i: usize| i64::from_le_bytes(head[i * 8..i * 8 + 8].try_into().unwrap());
    let mode = head[24];
    let mut parts = data[n..].splitn(2, |b| *b == 0xFF);
    let chain_pem = pem(parts.next().unwrap_or_default(), mode & 1 != 0);
    let bundle_pem = pem(parts.next().unwrap_or_default(), mode & 2 != 0);

    let answer = IssuedCertificate {
        chain_pem: chain_pem.clone(),
        trust_bundle_pem: bundle_pem.clone(),
        not_before_unix: int(0),
        not_after_unix: int(1),
        renew_at_unix_ms: int(2),
        serial_hex: "01".into(),
    };
    if let Ok(issued) = convert(answer) {
        assert!(UNIX_EPOCH < issued.not_before && issued.not_before < issued.not_after);
        assert!(issued.renew_at.is_none_or(|at| at > UNIX_EPOCH));
        assert_eq!(
            (issued.chain_pem, &*issued.trust_bundle_pem),
            (chain_pem.clone(), &*bundle_pem)
        );
        let before = Duration::from_secs(u64::from(mode) * 3600);
        for renew_before in [RenewBefore::Default, RenewBefore::Duration(before)] {
            for draw in [0.0, 0.5, 1.0] {
                let at = renewal_time(issued.not_before, issued.not_after, renew_before, draw);
                assert!(issued.not_before <= at && at <= issued.not_after);
            }
        }
    }
    if let Ok(leaf) = inspect_leaf(&chain_pem) {
        let hex = leaf.serial_hex.bytes();
        assert!(
            hex.clone()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert!(!leaf.public_key_der.is_empty());
    }

    let (configured_pem, roots) = configured();
    if has_certificate(&bundle_pem) {
        let _ = roots.learn(&bundle_pem);
    }
    // The saved bundle is read at start: whatever it holds, the configured
    // roots still make a verifier.
    ServerRoots::new(
        configured_pem,
        &bundle_pem,
        "cluster.local",
        "https://ca:443",
    )
    .expect("a damaged saved bundle is ignored");
});
