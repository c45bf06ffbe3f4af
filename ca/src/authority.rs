//! The signing authority.

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use zeroize::Zeroizing;

use crate::csr::VerifiedCsr;
use crate::error::{CaError, IssueError};
use crate::inspect::{
    parse_certificate, rfc3339, serial_hex, system_time, unix_seconds, verify_ders,
};
use crate::key::{KeyMaterial, KeyType, PrivateKey};
use crate::pem;
use crate::policy::{IssuanceRequest, Policy};
use crate::public_key::{VerifiedPublicKey, replace_spki_and_resign};

/// Common name of the generated development CA.
const DEV_CA_COMMON_NAME: &str = "credlet dev CA";
/// Lifetime of the generated development CA.
const DEV_CA_LIFETIME_SECS: i64 = 365 * 24 * 60 * 60;
/// How far the development CA's notBefore is back-dated, for clock skew.
const DEV_CA_BACKDATE_SECS: i64 = 60;

/// A signed leaf certificate with what a pod needs to use it.
#[derive(Clone, Debug)]
pub struct IssuedCertificate {
    /// The leaf, then the intermediates (not the root), PEM.
    pub chain_pem: String,
    /// The roots to trust, PEM.
    pub trust_bundle_pem: String,
    /// The leaf's serial number, lowercase hex (as [`CertificateInfo::serial_hex`](crate::CertificateInfo)).
    pub serial_hex: String,
    /// The leaf's notBefore (whole seconds).
    pub not_before: SystemTime,
    /// The leaf's notAfter (whole seconds).
    pub not_after: SystemTime,
}

/// The signing authority: CA key and certificate (root or intermediate),
/// the intermediates to hand out with each leaf, the trust bundle and the
/// issuance policy. Everything derived from the CA certificate is prepared
/// once, at construction.
pub struct Authority {
    policy: Policy,
    issuer: Issuer<'static, KeyMaterial>,
    ca_subject: String,
    ca_not_before: i64,
    ca_not_after: i64,
    /// PEM of the chain certificates that are not roots in the trust bundle.
    intermediates_pem: String,
    trust_bundle_pem: String,
    rng: SystemRandom,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority")
            .field("ca_subject", &self.ca_subject)
            .field("ca_key_type", &self.issuer.key().key_type())
            .field("ca_key", &"<redacted>")
            .field("ca_not_before", &rfc3339(self.ca_not_before))
            .field("ca_not_after", &rfc3339(self.ca_not_after))
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// A fresh self-signed ECDSA P-256 root (`CN=credlet dev CA`, one year,
    /// CA with path length 0, keyCertSign and cRLSign), for `--dev-ca` and
    /// the demo. The key exists only in memory.
    pub fn generate_self_signed(policy: Policy) -> Result<Self, CaError> {
        Self::generate_self_signed_with_pems(policy).map(|(authority, _, _)| authority)
    }

    /// Like [`Authority::generate_self_signed`], also returning the CA
    /// certificate PEM and the CA key PEM (PKCS#8), so that the CA can be
    /// written to files and loaded again with [`Authority::from_pem`].
    pub fn generate_self_signed_with_pems(
        policy: Policy,
    ) -> Result<(Self, String, Zeroizing<String>), CaError> {
        policy
            .validate()
            .map_err(|reason| CaError::InvalidPolicy { reason })?;
        let rng = SystemRandom::new();
        let key = PrivateKey::generate(KeyType::EcdsaP256)?;
        let not_before = unix_seconds(SystemTime::now())? - DEV_CA_BACKDATE_SECS;

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, DEV_CA_COMMON_NAME);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(SerialNumber::from_slice(&random_serial(&rng).map_err(
            |()| CaError::Encoding {
                what: "CA certificate",
                reason: "the system random number generator failed".to_owned(),
            },
        )?));
        params.not_before = datetime(not_before)?;
        params.not_after = datetime(not_before + DEV_CA_LIFETIME_SECS)?;
        let cert = params
            .self_signed(key.material())
            .map_err(|e| CaError::Encoding {
                what: "CA certificate",
                reason: e.to_string(),
            })?;

        let mut cert_pem = String::new();
        pem::encode_into(&mut cert_pem, pem::CERTIFICATE, cert.der());
        let (material, key_pem) = key.into_parts();
        let authority = Self::assemble(
            policy,
            cert.der(),
            material,
            String::new(),
            cert_pem.clone(),
        )?;
        Ok((authority, cert_pem, key_pem))
    }

    /// Loads a CA from PEM text: `chain_pem` holds the signing certificate
    /// first, then any intermediates up to (not including) the root;
    /// `key_pem` the signing certificate's PKCS#8 key; `trust_bundle_pem` one
    /// or more roots. Checks that the key matches the certificate, that the
    /// certificate is a CA allowed to sign certificates, and that the chain
    /// verifies against the trust bundle now.
    pub fn from_pem(
        chain_pem: &str,
        key_pem: &str,
        trust_bundle_pem: &str,
        policy: Policy,
    ) -> Result<Self, CaError> {
        policy
            .validate()
            .map_err(|reason| CaError::InvalidPolicy { reason })?;
        let chain = pem::certificates(chain_pem, "CA certificate chain")?;
        let roots = pem::certificates(trust_bundle_pem, "trust bundle")?;
        let key = PrivateKey::from_pem(key_pem)?;
        verify_ders(&chain, &roots, SystemTime::now(), true)?;

        let mut intermediates_pem = String::new();
        for der in chain.iter().filter(|der| !roots.contains(der)) {
            pem::encode_into(&mut intermediates_pem, pem::CERTIFICATE, der);
        }
        let mut bundle_pem = String::new();
        for der in &roots {
            pem::encode_into(&mut bundle_pem, pem::CERTIFICATE, der);
        }
        let (material, _) = key.into_parts();
        Self::assemble(policy, &chain[0], material, intermediates_pem, bundle_pem)
    }

    fn assemble(
        policy: Policy,
        ca_der: &[u8],
        key: KeyMaterial,
        intermediates_pem: String,
        trust_bundle_pem: String,
    ) -> Result<Self, CaError> {
        let ca = parse_certificate(ca_der, "CA certificate")?;
        let ca_subject = ca.subject().to_string();
        let not_ca = |reason: &str| CaError::NotACa {
            subject: ca_subject.clone(),
            reason: reason.to_owned(),
        };
        match ca.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            Ok(_) => return Err(not_ca("basic constraints do not say CA:TRUE")),
            Err(e) => return Err(not_ca(&format!("basic constraints: {e}"))),
        }
        match ca.key_usage() {
            Ok(Some(usage)) if !usage.value.key_cert_sign() => {
                return Err(not_ca("key usage lacks keyCertSign"));
            }
            Ok(_) => {}
            Err(e) => return Err(not_ca(&format!("key usage: {e}"))),
        }
        if !key.matches_spki(ca.public_key()) {
            return Err(CaError::KeyMismatch {
                what: format!("CA certificate {ca_subject:?}"),
            });
        }
        let unsupported = |reason: String| CaError::UnsupportedCaCertificate {
            subject: ca_subject.clone(),
            reason,
        };
        // rcgen can only re-encode single-valued RDNs (and panics on empty ones).
        if ca.subject().iter().any(|rdn| rdn.iter().count() != 1) {
            return Err(unsupported(
                "its subject has an empty or multi-valued RDN".to_owned(),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&ca_der.into(), key)
            .map_err(|e| unsupported(e.to_string()))?;
        let validity = ca.validity();
        let authority = Self {
            policy,
            issuer,
            ca_subject: ca_subject.clone(),
            ca_not_before: validity.not_before.timestamp(),
            ca_not_after: validity.not_after.timestamp(),
            intermediates_pem,
            trust_bundle_pem,
            rng: SystemRandom::new(),
        };
        authority.self_test(&ca).map_err(unsupported)?;
        Ok(authority)
    }

    /// Signs a throwaway certificate and checks that it names the CA exactly
    /// as the CA certificate does and verifies with its key. rcgen rebuilds
    /// the issuer name from parsed values; this catches any re-encoding that
    /// would make issued certificates fail to chain.
    fn self_test(&self, ca: &X509Certificate<'_>) -> Result<(), String> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.serial_number = Some(SerialNumber::from_slice(&[1]));
        params.not_before = datetime(self.ca_not_before).map_err(|e| e.to_string())?;
        params.not_after = datetime(self.ca_not_after).map_err(|e| e.to_string())?;
        params.use_authority_key_identifier_extension = true;
        let probe = params
            .signed_by(self.issuer.key(), &self.issuer)
            .map_err(|e| format!("signing a test certificate failed: {e}"))?;
        let probe =
            parse_certificate(probe.der(), "test certificate").map_err(|e| e.to_string())?;
        if probe.issuer().as_raw() != ca.subject().as_raw() {
            return Err(
                "its subject name can not be reproduced byte for byte in issued certificates"
                    .to_owned(),
            );
        }
        probe
            .verify_signature(Some(ca.public_key()))
            .map_err(|e| format!("a test certificate does not verify with its key: {e}"))
    }

    /// The issuance policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// When the CA certificate that signs expires (its notAfter, seconds
    /// since the epoch); nothing it signs outlives it.
    pub fn ca_not_after_unix(&self) -> i64 {
        self.ca_not_after
    }

    /// The trust bundle (roots), PEM.
    pub fn trust_bundle_pem(&self) -> &str {
        &self.trust_bundle_pem
    }

    /// Verifies the CSR (proof of possession), applies the policy and signs
    /// a leaf for `request.identity`.
    ///
    /// The leaf gets: the CSR's public key (nothing else from the CSR); a
    /// random positive 128-bit serial; validity from `now` (rounded down to
    /// the second) for `request.duration`; subject `CN=<common_name>` or an
    /// empty subject; SANs = SPIFFE URI, DNS names, IP addresses (critical
    /// when the subject is empty); keyUsage digitalSignature; extKeyUsage
    /// serverAuth and clientAuth; basicConstraints CA:FALSE; subject and
    /// authority key identifiers. A leaf that would outlive the CA
    /// certificate is refused.
    pub fn issue(
        &self,
        request: &IssuanceRequest,
        now: SystemTime,
    ) -> Result<IssuedCertificate, IssueError> {
        let csr = VerifiedCsr::from_der(&request.csr_der)?;
        self.issue_verified(&csr, request, now)
    }

    /// [`Authority::issue`] for a CSR the caller has already verified (a
    /// service that checks the proof of possession before asking the API
    /// server about the token): `csr` is used, `request.csr_der` is not
    /// read again.
    pub fn issue_verified(
        &self,
        csr: &VerifiedCsr,
        request: &IssuanceRequest,
        now: SystemTime,
    ) -> Result<IssuedCertificate, IssueError> {
        self.sign_request(csr, Some(csr.key_type()), request, now)
    }

    /// Signs a leaf for `request.identity` certifying the public half of
    /// `key`, a key held in this process: possession needs no proof, so no
    /// CSR is built or verified (the in-process issuer of `--dev-ca` and the
    /// demo). Everything else is as in [`Authority::issue`], including the
    /// key type check; `request.csr_der` is not read.
    pub fn issue_for_own_key(
        &self,
        key: &PrivateKey,
        request: &IssuanceRequest,
        now: SystemTime,
    ) -> Result<IssuedCertificate, IssueError> {
        self.sign_request(key, Some(key.key_type()), request, now)
    }

    /// Signs a leaf for `request.identity` certifying `key`, a public key
    /// whose possession was proven without a CSR of credlet's own (a
    /// Kubernetes PodCertificateRequest's `pkixPublicKey` with its proof, or
    /// its stub PKCS#10 request). Everything else is as in
    /// [`Authority::issue`]: the same policy checks on `request` (SPIFFE
    /// ID, DNS and IP SANs, common name, lifetime bounds) and the same leaf.
    /// `request.csr_der` is not read.
    ///
    /// The key type is not checked against
    /// [`Policy::allowed_key_types`](crate::Policy), which governs CSRs:
    /// which PodCertificateRequest key types to accept is the caller's
    /// decision, made before the proof is verified. The leaf's validity is
    /// whole seconds, `now` rounded down for `request.duration`, so the
    /// returned `not_before`/`not_after` equal the certificate's exactly.
    pub fn issue_for_public_key(
        &self,
        key: &VerifiedPublicKey,
        request: &IssuanceRequest,
        now: SystemTime,
    ) -> Result<IssuedCertificate, IssueError> {
        self.sign_request(key, None, request, now)
    }

    /// The policy checks of `request` (and of `key_type` when given), then
    /// the leaf for `key`.
    fn sign_request(
        &self,
        key: &impl SubjectKey,
        key_type: Option<KeyType>,
        request: &IssuanceRequest,
        now: SystemTime,
    ) -> Result<IssuedCertificate, IssueError> {
        let spiffe_id = self.policy.check_request(request)?;
        if let Some(key_type) = key_type {
            self.policy.check_key_type(key_type)?;
        }
        self.sign_leaf(
            key,
            spiffe_id.into_owned(),
            &request.dns_names,
            &request.ip_addresses,
            request.common_name.as_deref(),
            request.duration,
            now,
        )
    }

    /// Signs a leaf for a credlet component rather than a pod: an agent's
    /// client certificate (URI SAN `spiffe://<trust-domain>/credlet/node/<node>`)
    /// or the CA service's own serving certificate. The caller chooses the
    /// names; they are held to the same rules as a pod's: `uri` must be a
    /// SPIFFE ID in the policy's trust domain whose path starts with
    /// `credlet/` (a path no pod identity `ns/<ns>/sa/<sa>` can take), DNS
    /// names must be valid non-wildcard host names, the lifetime must lie
    /// within the policy's bounds and the CSR's key type must be allowed.
    /// The leaf has an empty subject and the same extensions as
    /// [`Authority::issue`].
    pub fn issue_component(
        &self,
        csr_der: &[u8],
        uri: &str,
        dns_names: &[String],
        ip_addresses: &[IpAddr],
        duration: Duration,
        now: SystemTime,
    ) -> Result<IssuedCertificate, IssueError> {
        self.policy
            .check_component(uri, dns_names, ip_addresses, duration)?;
        let csr = VerifiedCsr::from_der(csr_der)?;
        self.policy.check_key_type(csr.key_type())?;
        self.sign_leaf(
            &csr,
            uri.to_owned(),
            dns_names,
            ip_addresses,
            None,
            duration,
            now,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn sign_leaf(
        &self,
        subject_key: &impl SubjectKey,
        uri: String,
        dns_names: &[String],
        ip_addresses: &[IpAddr],
        common_name: Option<&str>,
        duration: Duration,
        now: SystemTime,
    ) -> Result<IssuedCertificate, IssueError> {
        let signing = |reason: String| IssueError::Signing { reason };
        let not_before = unix_seconds(now).map_err(|e| signing(e.to_string()))?;
        let not_after = i64::try_from(duration.as_secs())
            .ok()
            .and_then(|lifetime| not_before.checked_add(lifetime))
            .ok_or_else(|| signing(format!("lifetime {duration:?} is out of range")))?;
        if not_before < self.ca_not_before || not_after > self.ca_not_after {
            return Err(signing(format!(
                "the certificate would be valid from {} until {}, outside the CA certificate's validity ({} until {})",
                rfc3339(not_before),
                rfc3339(not_after),
                rfc3339(self.ca_not_before),
                rfc3339(self.ca_not_after)
            )));
        }
        let serial = random_serial(&self.rng)
            .map_err(|()| signing("the system random number generator failed".to_owned()))?;

        let mut params = CertificateParams::default();
        params.not_before = datetime(not_before).map_err(|e| signing(e.to_string()))?;
        params.not_after = datetime(not_after).map_err(|e| signing(e.to_string()))?;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.distinguished_name = DistinguishedName::new();
        if let Some(cn) = common_name {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        let ia5 = |s: String| Ia5String::try_from(s).map_err(|e| signing(e.to_string()));
        let mut sans = Vec::with_capacity(1 + dns_names.len() + ip_addresses.len());
        sans.push(SanType::URI(ia5(uri)?));
        for name in dns_names {
            sans.push(SanType::DnsName(ia5(name.clone())?));
        }
        sans.extend(ip_addresses.iter().copied().map(SanType::IpAddress));
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;

        let cert = params
            .signed_by(&subject_key.rcgen_key(), &self.issuer)
            .map_err(|e| signing(e.to_string()))?;
        let replaced;
        let der: &[u8] = match subject_key.stand_in() {
            None => cert.der(),
            Some((written, real)) => {
                replaced = replace_spki_and_resign(cert.der(), &written, real, |tbs| {
                    rcgen::SigningKey::sign(self.issuer.key(), tbs).map_err(|e| e.to_string())
                })
                .map_err(signing)?;
                &replaced
            }
        };
        let mut chain_pem = String::with_capacity(
            pem::encoded_len(pem::CERTIFICATE, der.len()) + self.intermediates_pem.len(),
        );
        pem::encode_into(&mut chain_pem, pem::CERTIFICATE, der);
        chain_pem.push_str(&self.intermediates_pem);

        Ok(IssuedCertificate {
            chain_pem,
            trust_bundle_pem: self.trust_bundle_pem.clone(),
            serial_hex: serial_hex(&serial),
            not_before: system_time(not_before),
            not_after: system_time(not_after),
        })
    }
}

/// A public key a leaf can be signed for.
trait SubjectKey {
    /// The key as rcgen certifies it.
    fn rcgen_key(&self) -> impl rcgen::PublicKeyData + '_;

    /// When rcgen can not write this key's SubjectPublicKeyInfo: the one it
    /// writes instead, and the real one to put in its place.
    fn stand_in(&self) -> Option<(Vec<u8>, &[u8])> {
        None
    }
}

impl SubjectKey for VerifiedCsr {
    fn rcgen_key(&self) -> impl rcgen::PublicKeyData + '_ {
        self.rcgen_public_key()
    }
}

impl SubjectKey for PrivateKey {
    fn rcgen_key(&self) -> impl rcgen::PublicKeyData + '_ {
        self.material()
    }
}

impl SubjectKey for VerifiedPublicKey {
    fn rcgen_key(&self) -> impl rcgen::PublicKeyData + '_ {
        self.rcgen_view()
    }

    fn stand_in(&self) -> Option<(Vec<u8>, &[u8])> {
        self.stand_in_spki().map(|s| (s, self.public_key_der()))
    }
}

/// 16 random bytes with the top bit clear (positive) and the next bit set
/// (so the DER integer is always exactly 16 bytes): 126 bits of entropy.
fn random_serial(rng: &SystemRandom) -> Result<[u8; 16], ()> {
    let mut serial = [0u8; 16];
    rng.fill(&mut serial).map_err(|_| ())?;
    serial[0] = (serial[0] & 0x7f) | 0x40;
    Ok(serial)
}

fn datetime(unix_seconds: i64) -> Result<OffsetDateTime, CaError> {
    OffsetDateTime::from_unix_timestamp(unix_seconds).map_err(|e| CaError::TimeOutOfRange {
        reason: format!("{unix_seconds} seconds after the epoch: {e}"),
    })
}
