//! Reading certificates back: leaf facts, key matching and chain
//! verification.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::error::CaError;
use crate::key::PrivateKey;
use crate::pem;

/// Longest chain (leaf, intermediates and root) accepted.
const MAX_CHAIN_LEN: usize = 8;

/// Facts read back from the first certificate of a PEM chain.
#[derive(Clone, Debug)]
pub struct CertificateInfo {
    /// Serial number, lowercase hex without separators or leading zero bytes.
    pub serial_hex: String,
    /// Subject distinguished name (`CN=…`), empty for an empty subject.
    pub subject: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// URI subject alternative names (the SPIFFE ID).
    pub uris: Vec<String>,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// IP address subject alternative names.
    pub ip_addresses: Vec<IpAddr>,
    /// The certificate's public key as a DER SubjectPublicKeyInfo.
    pub public_key_der: Vec<u8>,
}

/// Reads the first certificate of a PEM chain.
pub fn inspect_leaf(chain_pem: &str) -> Result<CertificateInfo, CaError> {
    let der = pem::first_certificate(chain_pem, "certificate chain")?;
    inspect_certificate(&der)
}

/// Reads one DER certificate (as a TLS peer presents it).
pub fn inspect_certificate(der: &[u8]) -> Result<CertificateInfo, CaError> {
    let cert = parse_certificate(der, "leaf certificate")?;
    let cert_err = |reason: String| CaError::Certificate {
        what: "leaf certificate".to_owned(),
        reason,
    };

    let mut uris = Vec::new();
    let mut dns_names = Vec::new();
    let mut ip_addresses = Vec::new();
    let san = cert
        .subject_alternative_name()
        .map_err(|e| cert_err(format!("subject alternative names: {e}")))?;
    for name in san.iter().flat_map(|ext| &ext.value.general_names) {
        match name {
            GeneralName::URI(uri) => uris.push((*uri).to_owned()),
            GeneralName::DNSName(dns) => dns_names.push((*dns).to_owned()),
            GeneralName::IPAddress(octets) => ip_addresses
                .push(ip_from_octets(octets).ok_or_else(|| {
                    cert_err(format!("IP address SAN of {} bytes", octets.len()))
                })?),
            _ => {}
        }
    }

    let validity = cert.validity();
    Ok(CertificateInfo {
        serial_hex: serial_hex(cert.raw_serial()),
        subject: cert.subject().to_string(),
        not_before: system_time(validity.not_before.timestamp()),
        not_after: system_time(validity.not_after.timestamp()),
        uris,
        dns_names,
        ip_addresses,
        public_key_der: cert.public_key().raw.to_vec(),
    })
}

/// True when the private key's public half equals the public key of the
/// chain's first certificate.
pub fn key_matches_certificate(key_pem: &str, chain_pem: &str) -> Result<bool, CaError> {
    let key = PrivateKey::from_pem(key_pem)?;
    let der = pem::first_certificate(chain_pem, "certificate chain")?;
    let cert = parse_certificate(&der, "leaf certificate")?;
    Ok(key.material().matches_spki(cert.public_key()))
}

/// Verifies that the chain's first certificate chains, through the other
/// certificates in `chain_pem`, to one of the roots in `trust_bundle_pem`
/// with valid signatures; that every issuer on the path is a CA allowed to
/// sign certificates; and that every certificate on the path is valid at
/// `now`.
pub fn verify_chain(
    chain_pem: &str,
    trust_bundle_pem: &str,
    now: SystemTime,
) -> Result<(), CaError> {
    let chain = pem::certificates(chain_pem, "certificate chain")?;
    let roots = pem::certificates(trust_bundle_pem, "trust bundle")?;
    verify_ders(&chain, &roots, now, false)
}

/// [`verify_chain`] on DER certificates. With `first_is_ca` the first
/// certificate counts as an intermediate for path length constraints (it is
/// a CA that will sign leaves).
pub(crate) fn verify_ders(
    chain: &[Vec<u8>],
    roots: &[Vec<u8>],
    now: SystemTime,
    first_is_ca: bool,
) -> Result<(), CaError> {
    if chain.len() >= MAX_CHAIN_LEN {
        return Err(CaError::ChainTooLong { max: MAX_CHAIN_LEN });
    }
    let now = unix_seconds(now)?;
    let chain = chain
        .iter()
        .enumerate()
        .map(|(i, der)| parse_certificate(der, &format!("certificate #{} of the chain", i + 1)))
        .collect::<Result<Vec<_>, _>>()?;
    let roots = roots
        .iter()
        .enumerate()
        .map(|(i, der)| {
            parse_certificate(der, &format!("certificate #{} of the trust bundle", i + 1))
        })
        .collect::<Result<Vec<_>, _>>()?;

    let mut used = vec![false; chain.len()];
    used[0] = true;
    let mut current = &chain[0];
    check_time(current, now)?;
    // Number of intermediate CA certificates below the issuer being looked for.
    let mut intermediates_below = u32::from(first_is_ca);
    loop {
        // A certificate that is itself in the trust bundle is trusted as is
        // (a CA chain file may end with, or be, the root).
        if roots.iter().any(|root| root.as_raw() == current.as_raw()) {
            return Ok(());
        }
        let mut failure = None;
        for root in &roots {
            if root.subject().as_raw() != current.issuer().as_raw() {
                continue;
            }
            match check_issued_by(current, root, intermediates_below) {
                Ok(()) => return check_time(root, now),
                Err(e) => failure = Some(e),
            }
        }
        let mut next = None;
        for (i, candidate) in chain.iter().enumerate() {
            if used[i] || candidate.subject().as_raw() != current.issuer().as_raw() {
                continue;
            }
            match check_issued_by(current, candidate, intermediates_below) {
                Ok(()) => {
                    next = Some(i);
                    break;
                }
                Err(e) => failure = Some(e),
            }
        }
        let Some(i) = next else {
            return Err(failure.unwrap_or_else(|| CaError::UnknownIssuer {
                subject: current.subject().to_string(),
                issuer: current.issuer().to_string(),
            }));
        };
        used[i] = true;
        current = &chain[i];
        check_time(current, now)?;
        intermediates_below += 1;
    }
}

/// Checks that `issuer` signed `cert` and may sign certificates.
fn check_issued_by(
    cert: &X509Certificate<'_>,
    issuer: &X509Certificate<'_>,
    intermediates_below: u32,
) -> Result<(), CaError> {
    // The signature first: if it does not verify, this is not the issuer and
    // its constraints are beside the point.
    cert.verify_signature(Some(issuer.public_key()))
        .map_err(|e| CaError::BadCertificateSignature {
            subject: cert.subject().to_string(),
            issuer: issuer.subject().to_string(),
            reason: e.to_string(),
        })?;
    let not_ca = |reason: String| CaError::NotACa {
        subject: issuer.subject().to_string(),
        reason,
    };
    let constraints = issuer
        .basic_constraints()
        .map_err(|e| not_ca(format!("basic constraints: {e}")))?
        .ok_or_else(|| not_ca("no basic constraints extension".to_owned()))?;
    if !constraints.value.ca {
        return Err(not_ca("basic constraints say CA:FALSE".to_owned()));
    }
    if let Some(max) = constraints.value.path_len_constraint
        && intermediates_below > max
    {
        return Err(not_ca(format!(
            "path length constraint {max} exceeded by {intermediates_below} intermediate(s) below it"
        )));
    }
    if let Some(usage) = issuer
        .key_usage()
        .map_err(|e| not_ca(format!("key usage: {e}")))?
        && !usage.value.key_cert_sign()
    {
        return Err(not_ca("key usage lacks keyCertSign".to_owned()));
    }
    Ok(())
}

fn check_time(cert: &X509Certificate<'_>, now: i64) -> Result<(), CaError> {
    let validity = cert.validity();
    let not_before = validity.not_before.timestamp();
    let not_after = validity.not_after.timestamp();
    if (not_before..=not_after).contains(&now) {
        return Ok(());
    }
    Err(CaError::NotValidAt {
        subject: cert.subject().to_string(),
        not_before: rfc3339(not_before),
        not_after: rfc3339(not_after),
        now: rfc3339(now),
    })
}

/// Parses one DER certificate, refusing trailing bytes.
pub(crate) fn parse_certificate<'a>(
    der: &'a [u8],
    what: &str,
) -> Result<X509Certificate<'a>, CaError> {
    let err = |reason: String| CaError::Certificate {
        what: what.to_owned(),
        reason,
    };
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| err(e.to_string()))?;
    if !rest.is_empty() {
        return Err(err(format!("{} trailing bytes", rest.len())));
    }
    Ok(cert)
}

fn ip_from_octets(octets: &[u8]) -> Option<IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(octets) {
        return Some(IpAddr::from(v4));
    }
    <[u8; 16]>::try_from(octets).ok().map(IpAddr::from)
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Lowercase hex of a big-endian integer, without leading zero bytes.
pub(crate) fn serial_hex(raw: &[u8]) -> String {
    let first = raw
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    let digits = &raw[first..];
    let mut out = String::with_capacity(digits.len() * 2);
    for b in digits {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
    out
}

/// Whole seconds since the Unix epoch (rounded down).
pub(crate) fn unix_seconds(t: SystemTime) -> Result<i64, CaError> {
    let out_of_range = || CaError::TimeOutOfRange {
        reason: format!("{t:?} can not be expressed in a certificate"),
    };
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).map_err(|_| out_of_range()),
        Err(before) => {
            let d = before.duration();
            let secs = i64::try_from(d.as_secs()).map_err(|_| out_of_range())?;
            Ok(if d.subsec_nanos() > 0 {
                -secs - 1
            } else {
                -secs
            })
        }
    }
}

/// The instant `secs` seconds after the Unix epoch.
pub(crate) fn system_time(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// `secs` as an RFC 3339 UTC timestamp, for messages.
pub(crate) fn rfc3339(secs: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("@{secs}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_hex_strips_leading_zeros() {
        assert_eq!(serial_hex(&[0x00, 0x8f, 0x01]), "8f01");
        assert_eq!(serial_hex(&[0x00]), "00");
        assert_eq!(serial_hex(&[0x7f, 0x00]), "7f00");
    }

    #[test]
    fn time_helpers() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_500);
        assert_eq!(unix_seconds(t).unwrap(), 1);
        assert_eq!(
            unix_seconds(UNIX_EPOCH - Duration::from_millis(500)).unwrap(),
            -1
        );
        assert_eq!(system_time(-5), UNIX_EPOCH - Duration::from_secs(5));
    }
}
