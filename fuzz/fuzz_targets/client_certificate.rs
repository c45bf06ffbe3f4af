//! Fuzzes how a presented certificate's identity is read: the CA's
//! `tls::node_of_certificate` (the node of an agent's client certificate),
//! `credlet_ca::inspect_certificate`, and the agent's
//! `ServerRoots::check_identity` (the CA's reserved SPIFFE ID on its serving
//! certificate). No panics, and the three agree on the URI SANs.
//!
//! Input: a mode byte, then
//! - mode even: a DER certificate, as a TLS peer presents it;
//! - mode odd: SANs separated by 0xFF, each a type byte (URI, DNS, IPv4,
//!   IPv6, by value mod 4) and the value, put into a certificate the
//!   harness signs, so that the SAN readers see any name list.
#![no_main]

use std::net::IpAddr;
use std::sync::OnceLock;

use credlet_ca::{Authority, Policy, ca_spiffe_id, inspect_certificate};
use credlet_ca_service::ServicePolicy;
use credlet_ca_service::tls::node_of_certificate;
use credlet_csi::remote::ServerRoots;
use libfuzzer_sys::fuzz_target;
use rcgen::{CertificateParams, KeyPair, SanType};

const TRUST_DOMAIN: &str = "cluster.local";

struct Fixture {
    policy: ServicePolicy,
    roots: ServerRoots,
    key: KeyPair,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let ca = Authority::generate_self_signed(Policy::new(TRUST_DOMAIN)).unwrap();
        Fixture {
            policy: ServicePolicy::new(TRUST_DOMAIN),
            roots: ServerRoots::new(ca.trust_bundle_pem(), "", TRUST_DOMAIN, "https://ca:443")
                .unwrap(),
            key: KeyPair::generate().unwrap(),
        }
    })
}

/// A certificate with these SANs, or `None` when rcgen refuses a value.
fn certificate(data: &[u8], key: &KeyPair) -> Option<(Vec<u8>, Vec<String>)> {
    let mut params = CertificateParams::default();
    let mut uris = Vec::new();
    for san in data.split(|b| *b == 0xFF).filter(|s| !s.is_empty()) {
        let (kind, value) = (san[0] % 4, &san[1..]);
        let text = || String::from_utf8(value.to_vec()).ok()?.try_into().ok();
        params.subject_alt_names.push(match kind {
            0 => {
                let uri = text()?;
                uris.push(String::from_utf8(value.to_vec()).ok()?);
                SanType::URI(uri)
            }
            1 => SanType::DnsName(text()?),
            2 => SanType::IpAddress(IpAddr::from(<[u8; 4]>::try_from(value).ok()?)),
            _ => SanType::IpAddress(IpAddr::from(<[u8; 16]>::try_from(value).ok()?)),
        });
    }
    let cert = params.self_signed(key).ok()?;
    Some((cert.der().to_vec(), uris))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let f = fixture();
    let (der, built_uris) = if mode % 2 == 0 {
        (rest.to_vec(), None)
    } else {
        match certificate(rest, &f.key) {
            Some((der, uris)) => (der, Some(uris)),
            None => return,
        }
    };

    let node = node_of_certificate(&der, &f.policy);
    let identity = f.roots.check_identity(&der);
    let Ok(info) = inspect_certificate(&der) else {
        assert!(
            built_uris.is_none(),
            "a certificate the harness built does not read back"
        );
        assert!(identity.is_err());
        return;
    };
    if let Some(uris) = built_uris {
        assert_eq!(info.uris, uris);
    }
    let expected = info
        .uris
        .iter()
        .find_map(|uri| f.policy.node_of_spiffe_id(uri));
    assert_eq!(node.as_deref(), expected);
    if let Some(node) = &node {
        assert!(info.uris.contains(&f.policy.node_spiffe_id(node)));
    }
    assert_eq!(
        identity.is_ok(),
        info.uris.contains(&ca_spiffe_id(TRUST_DOMAIN)),
        "{identity:?}"
    );
});
