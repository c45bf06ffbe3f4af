//! Pod identities, issuance requests and the policy that bounds them.

use std::borrow::Cow;
use std::net::IpAddr;
use std::time::Duration;

use crate::error::PolicyError;
use crate::key::KeyType;

/// The pod a certificate is for. This, not the CSR, is the source of the
/// certificate's identity.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PodIdentity {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// The pod's UID.
    pub uid: String,
    /// The pod's service account name.
    pub service_account: String,
}

/// What to put in a certificate, already template-expanded by the caller.
#[derive(Clone, Debug)]
pub struct IssuanceRequest {
    /// DER PKCS#10 CSR; only its public key is used, after its signature
    /// verifies.
    pub csr_der: Vec<u8>,
    /// The pod the certificate is for.
    pub identity: PodIdentity,
    /// The SPIFFE ID; `None` means `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
    pub spiffe_id: Option<String>,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// IP address subject alternative names.
    pub ip_addresses: Vec<IpAddr>,
    /// Subject common name; `None` leaves the subject empty.
    pub common_name: Option<String>,
    /// Requested lifetime; must lie within the policy's bounds.
    pub duration: Duration,
}

/// Issuance policy: bounds what any request may get.
#[derive(Clone, Debug)]
pub struct Policy {
    /// SPIFFE trust domain, for example `cluster.local`.
    pub trust_domain: String,
    /// Shortest lifetime issued.
    pub min_duration: Duration,
    /// Longest lifetime issued.
    pub max_duration: Duration,
    /// Most DNS names in one certificate.
    pub max_dns_names: usize,
    /// Most IP addresses in one certificate.
    pub max_ip_addresses: usize,
    /// Key types a CSR may use.
    pub allowed_key_types: Vec<KeyType>,
}

/// `spiffe://<trust-domain>/credlet/ca`: the URI SAN of the CA service's
/// serving certificate, which agents require of the server they send
/// tokens to. Reserved: every ID a pod can get lies below
/// `ns/<namespace>/sa/<service-account>` ([`Policy::check_spiffe_id`]), and
/// agents' client certificates below `credlet/node/`, so no certificate the
/// CA issues to anyone else carries it.
pub fn ca_spiffe_id(trust_domain: &str) -> String {
    format!("spiffe://{trust_domain}/credlet/ca")
}

/// Longest SPIFFE ID accepted, in bytes (the SPIFFE specification's limit).
const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain accepted, in bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Upper bound for commonName (X.520 ub-common-name), in characters.
const MAX_COMMON_NAME_CHARS: usize = 64;

impl Policy {
    /// Default shortest lifetime: 10 minutes.
    pub const DEFAULT_MIN_DURATION: Duration = Duration::from_secs(10 * 60);
    /// Default longest lifetime: 90 days.
    pub const DEFAULT_MAX_DURATION: Duration = Duration::from_secs(90 * 24 * 60 * 60);
    /// Default DNS name limit.
    pub const DEFAULT_MAX_DNS_NAMES: usize = 32;
    /// Default IP address limit.
    pub const DEFAULT_MAX_IP_ADDRESSES: usize = 16;

    /// A policy for `trust_domain` with the default bounds and every key type
    /// allowed.
    pub fn new(trust_domain: impl Into<String>) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            min_duration: Self::DEFAULT_MIN_DURATION,
            max_duration: Self::DEFAULT_MAX_DURATION,
            max_dns_names: Self::DEFAULT_MAX_DNS_NAMES,
            max_ip_addresses: Self::DEFAULT_MAX_IP_ADDRESSES,
            allowed_key_types: KeyType::ALL.to_vec(),
        }
    }

    /// The SPIFFE ID a pod gets when it asks for none:
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub fn default_spiffe_id(&self, identity: &PodIdentity) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, identity.namespace, identity.service_account
        )
    }

    /// Checks the policy itself (used when an authority is built).
    pub(crate) fn validate(&self) -> Result<(), String> {
        if let Err(reason) = check_trust_domain(&self.trust_domain) {
            return Err(format!("trust domain {:?}: {reason}", self.trust_domain));
        }
        if self.max_duration.is_zero() || self.min_duration > self.max_duration {
            return Err(format!(
                "duration bounds [{:?}, {:?}] are empty",
                self.min_duration, self.max_duration
            ));
        }
        if self.allowed_key_types.is_empty() {
            return Err("no key type is allowed".to_owned());
        }
        Ok(())
    }

    /// Applies every check that does not need the CSR. Returns the SPIFFE ID
    /// to put in the certificate.
    pub(crate) fn check_request<'r>(
        &self,
        request: &'r IssuanceRequest,
    ) -> Result<Cow<'r, str>, PolicyError> {
        if request.duration < self.min_duration {
            return Err(PolicyError::DurationTooShort {
                requested: request.duration,
                min: self.min_duration,
            });
        }
        if request.duration > self.max_duration {
            return Err(PolicyError::DurationTooLong {
                requested: request.duration,
                max: self.max_duration,
            });
        }
        if request.dns_names.len() > self.max_dns_names {
            return Err(PolicyError::TooManyDnsNames {
                count: request.dns_names.len(),
                max: self.max_dns_names,
            });
        }
        if request.ip_addresses.len() > self.max_ip_addresses {
            return Err(PolicyError::TooManyIpAddresses {
                count: request.ip_addresses.len(),
                max: self.max_ip_addresses,
            });
        }
        check_identity(&request.identity)?;
        for name in &request.dns_names {
            check_dns_name(name)?;
        }
        if let Some(cn) = &request.common_name {
            check_common_name(cn)?;
        }
        match &request.spiffe_id {
            Some(id) => {
                self.check_spiffe_id(id, &request.identity)?;
                Ok(Cow::Borrowed(id))
            }
            None => Ok(Cow::Owned(self.default_spiffe_id(&request.identity))),
        }
    }

    /// Checks the names and lifetime of a component certificate (see
    /// [`Authority::issue_component`](crate::Authority::issue_component)).
    pub(crate) fn check_component(
        &self,
        uri: &str,
        dns_names: &[String],
        ip_addresses: &[IpAddr],
        duration: Duration,
    ) -> Result<(), PolicyError> {
        if duration < self.min_duration {
            return Err(PolicyError::DurationTooShort {
                requested: duration,
                min: self.min_duration,
            });
        }
        if duration > self.max_duration {
            return Err(PolicyError::DurationTooLong {
                requested: duration,
                max: self.max_duration,
            });
        }
        if dns_names.len() > self.max_dns_names {
            return Err(PolicyError::TooManyDnsNames {
                count: dns_names.len(),
                max: self.max_dns_names,
            });
        }
        if ip_addresses.len() > self.max_ip_addresses {
            return Err(PolicyError::TooManyIpAddresses {
                count: ip_addresses.len(),
                max: self.max_ip_addresses,
            });
        }
        for name in dns_names {
            check_dns_name(name)?;
        }
        let prefix = format!("spiffe://{}/credlet/", self.trust_domain);
        let outside = || PolicyError::SpiffeIdOutsideIdentity {
            id: uri.to_owned(),
            expected: "credlet/<component>".to_owned(),
        };
        if !uri.starts_with(&prefix) {
            // Reuse the syntax checks for a precise reason first.
            if uri.contains(['?', '#']) {
                return Err(PolicyError::SpiffeIdQueryOrFragment { id: uri.to_owned() });
            }
            return Err(outside());
        }
        if uri.len() > MAX_SPIFFE_ID_LEN {
            return Err(PolicyError::InvalidSpiffeId {
                id: uri.to_owned(),
                reason: format!("longer than {MAX_SPIFFE_ID_LEN} bytes"),
            });
        }
        for segment in uri[prefix.len()..].split('/') {
            if segment.is_empty()
                || segment == "."
                || segment == ".."
                || !segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            {
                return Err(PolicyError::InvalidSpiffeId {
                    id: uri.to_owned(),
                    reason: format!(
                        "path segment {segment:?} is empty, \".\", \"..\" or has characters outside [A-Za-z0-9._-]"
                    ),
                });
            }
        }
        Ok(())
    }

    pub(crate) fn check_key_type(&self, key_type: KeyType) -> Result<(), PolicyError> {
        if self.allowed_key_types.contains(&key_type) {
            return Ok(());
        }
        let allowed = self
            .allowed_key_types
            .iter()
            .map(KeyType::name)
            .collect::<Vec<_>>()
            .join(", ");
        Err(PolicyError::KeyTypeNotAllowed { key_type, allowed })
    }

    /// The SPIFFE ID rule every issuance path applies to an ID a pod asks
    /// for: a valid ID in this policy's trust domain whose path is the
    /// pod's `ns/<namespace>/sa/<service-account>` or below it. Exposed so
    /// that a CA can refuse an ID before any other work, with the same rule
    /// signing applies. A well-formed ID that is not the pod's fails with
    /// [`PolicyError::ForeignTrustDomain`] or
    /// [`PolicyError::SpiffeIdOutsideIdentity`]; one that is not a valid
    /// SPIFFE ID with another variant.
    pub fn check_spiffe_id(&self, id: &str, identity: &PodIdentity) -> Result<(), PolicyError> {
        let invalid = |reason: String| PolicyError::InvalidSpiffeId {
            id: id.to_owned(),
            reason,
        };
        if id.len() > MAX_SPIFFE_ID_LEN {
            return Err(invalid(format!("longer than {MAX_SPIFFE_ID_LEN} bytes")));
        }
        if id.contains(['?', '#']) {
            return Err(PolicyError::SpiffeIdQueryOrFragment { id: id.to_owned() });
        }
        let rest = id
            .strip_prefix("spiffe://")
            .ok_or_else(|| invalid("must start with \"spiffe://\"".to_owned()))?;
        let (trust_domain, path) = rest
            .split_once('/')
            .ok_or_else(|| invalid("has no path".to_owned()))?;
        check_trust_domain(trust_domain)
            .map_err(|reason| invalid(format!("trust domain: {reason}")))?;
        if trust_domain != self.trust_domain {
            return Err(PolicyError::ForeignTrustDomain {
                id: id.to_owned(),
                trust_domain: trust_domain.to_owned(),
                expected: self.trust_domain.clone(),
            });
        }
        for segment in path.split('/') {
            if segment.is_empty() {
                return Err(invalid("path has an empty segment".to_owned()));
            }
            if segment == "." || segment == ".." {
                return Err(invalid("path has a \".\" or \"..\" segment".to_owned()));
            }
            if !segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            {
                return Err(invalid(format!(
                    "path segment {segment:?} has characters outside [A-Za-z0-9._-]"
                )));
            }
        }
        let tail = path
            .strip_prefix("ns/")
            .and_then(|p| p.strip_prefix(identity.namespace.as_str()))
            .and_then(|p| p.strip_prefix("/sa/"))
            .and_then(|p| p.strip_prefix(identity.service_account.as_str()));
        match tail {
            Some(t) if t.is_empty() || t.starts_with('/') => Ok(()),
            _ => Err(PolicyError::SpiffeIdOutsideIdentity {
                id: id.to_owned(),
                expected: format!("ns/{}/sa/{}", identity.namespace, identity.service_account),
            }),
        }
    }
}

fn check_identity(identity: &PodIdentity) -> Result<(), PolicyError> {
    let fields = [
        ("namespace", &identity.namespace),
        ("name", &identity.name),
        ("uid", &identity.uid),
        ("service_account", &identity.service_account),
    ];
    for (field, value) in fields {
        if value.is_empty() {
            return Err(PolicyError::EmptyIdentityField { field });
        }
    }
    // Namespace and service account go into the SPIFFE path: hold them to
    // Kubernetes name syntax so they can not smuggle in extra segments.
    if !is_k8s_label(&identity.namespace) {
        return Err(PolicyError::InvalidIdentityField {
            field: "namespace",
            value: identity.namespace.clone(),
            reason: "not a lowercase RFC 1123 label",
        });
    }
    if identity.service_account.len() > 253
        || !identity.service_account.split('.').all(is_k8s_label)
    {
        return Err(PolicyError::InvalidIdentityField {
            field: "service_account",
            value: identity.service_account.clone(),
            reason: "not a lowercase RFC 1123 subdomain",
        });
    }
    Ok(())
}

/// A lowercase RFC 1123 label, as Kubernetes requires for names.
fn is_k8s_label(label: &str) -> bool {
    is_dns_label(label) && !label.bytes().any(|b| b.is_ascii_uppercase())
}

/// An RFC 1123 label: 1 to 63 letters, digits and hyphens, not starting or
/// ending with a hyphen.
fn is_dns_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

fn check_dns_name(name: &str) -> Result<(), PolicyError> {
    let invalid = |reason| PolicyError::InvalidDnsName {
        name: name.to_owned(),
        reason,
    };
    if name.starts_with("*.") || name.contains('*') {
        return Err(PolicyError::WildcardDnsName {
            name: name.to_owned(),
        });
    }
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.len() > 253 {
        return Err(invalid("longer than 253 characters"));
    }
    if name.parse::<IpAddr>().is_ok() {
        return Err(invalid(
            "is an IP address; request it as an IP address instead",
        ));
    }
    if !name.split('.').all(is_dns_label) {
        return Err(invalid(
            "every label must be 1 to 63 letters, digits or hyphens, not starting or ending with a hyphen",
        ));
    }
    Ok(())
}

fn check_common_name(cn: &str) -> Result<(), PolicyError> {
    let invalid = |reason| PolicyError::InvalidCommonName {
        value: cn.to_owned(),
        reason,
    };
    if cn.is_empty() {
        return Err(invalid("empty"));
    }
    if cn.chars().count() > MAX_COMMON_NAME_CHARS {
        return Err(invalid("longer than 64 characters"));
    }
    if cn.chars().any(char::is_control) {
        return Err(invalid("contains control characters"));
    }
    Ok(())
}

/// SPIFFE trust domain syntax: lowercase letters, digits, '.', '-' and '_'.
fn check_trust_domain(trust_domain: &str) -> Result<(), String> {
    if trust_domain.is_empty() {
        return Err("empty".to_owned());
    }
    if trust_domain.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(format!("longer than {MAX_TRUST_DOMAIN_LEN} bytes"));
    }
    match trust_domain.bytes().find(|b| {
        !(b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    }) {
        None => Ok(()),
        Some(b) => Err(format!(
            "character {:?} is not allowed (only a-z, 0-9, '.', '-' and '_'; no port or user info)",
            char::from(b)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> PodIdentity {
        PodIdentity {
            namespace: "team-a".into(),
            name: "web-0".into(),
            uid: "8d3f0c1e-1111-2222-3333-444455556666".into(),
            service_account: "web".into(),
        }
    }

    fn request() -> IssuanceRequest {
        IssuanceRequest {
            csr_der: Vec::new(),
            identity: identity(),
            spiffe_id: None,
            dns_names: vec!["web.team-a.svc".into(), "Web.Example.COM".into()],
            ip_addresses: vec!["10.0.0.1".parse().unwrap()],
            common_name: Some("web".into()),
            duration: Duration::from_secs(3600),
        }
    }

    fn check_with(f: impl FnOnce(&mut IssuanceRequest)) -> Result<String, PolicyError> {
        let mut r = request();
        f(&mut r);
        Policy::new("cluster.local")
            .check_request(&r)
            .map(Cow::into_owned)
    }

    #[test]
    fn accepts_a_normal_request_and_defaults_the_spiffe_id() {
        assert_eq!(
            check_with(|_| {}).unwrap(),
            "spiffe://cluster.local/ns/team-a/sa/web"
        );
    }

    type Expect = fn(&PolicyError) -> bool;

    #[test]
    fn spiffe_id_rules() {
        let ok = [
            "spiffe://cluster.local/ns/team-a/sa/web",
            "spiffe://cluster.local/ns/team-a/sa/web/replica-0",
        ];
        for id in ok {
            assert_eq!(check_with(|r| r.spiffe_id = Some(id.into())).unwrap(), id);
        }
        let cases: [(&str, Expect); 10] = [
            ("spiffe://evil.org/ns/team-a/sa/web", |e| {
                matches!(e, PolicyError::ForeignTrustDomain { .. })
            }),
            ("spiffe://cluster.local/ns/team-b/sa/web", |e| {
                matches!(e, PolicyError::SpiffeIdOutsideIdentity { .. })
            }),
            ("spiffe://cluster.local/ns/team-a/sa/webby", |e| {
                matches!(e, PolicyError::SpiffeIdOutsideIdentity { .. })
            }),
            ("spiffe://cluster.local/ns/team-a/sa/web?x=1", |e| {
                matches!(e, PolicyError::SpiffeIdQueryOrFragment { .. })
            }),
            ("spiffe://cluster.local/ns/team-a/sa/web#f", |e| {
                matches!(e, PolicyError::SpiffeIdQueryOrFragment { .. })
            }),
            ("spiffe://cluster.local/ns/team-a/sa/web/../x", |e| {
                matches!(e, PolicyError::InvalidSpiffeId { .. })
            }),
            ("spiffe://cluster.local/ns/team-a/sa/web//x", |e| {
                matches!(e, PolicyError::InvalidSpiffeId { .. })
            }),
            ("spiffe://cluster.local:443/ns/team-a/sa/web", |e| {
                matches!(e, PolicyError::InvalidSpiffeId { .. })
            }),
            ("https://cluster.local/ns/team-a/sa/web", |e| {
                matches!(e, PolicyError::InvalidSpiffeId { .. })
            }),
            ("spiffe://cluster.local", |e| {
                matches!(e, PolicyError::InvalidSpiffeId { .. })
            }),
        ];
        for (id, expected) in cases {
            let err = check_with(|r| r.spiffe_id = Some(id.into())).unwrap_err();
            assert!(expected(&err), "{id}: {err}");
            assert!(err.to_string().contains(id), "message names the ID: {err}");
        }
    }

    #[test]
    fn dns_name_rules() {
        for bad in [
            "-a.example",
            "a-.example",
            "a..example",
            "a.example.",
            "",
            "a b",
            "ex_ample.com",
            "10.1.2.3",
            &"a".repeat(64),
        ] {
            let err = check_with(|r| r.dns_names = vec![bad.to_owned()]).unwrap_err();
            assert!(
                matches!(err, PolicyError::InvalidDnsName { .. }),
                "{bad:?}: {err}"
            );
        }
        let long = vec!["a".repeat(63); 4].join(".");
        assert!(matches!(
            check_with(|r| r.dns_names = vec![long.clone()]).unwrap_err(),
            PolicyError::InvalidDnsName { .. }
        ));
        assert!(matches!(
            check_with(|r| r.dns_names = vec!["*.example.com".into()]).unwrap_err(),
            PolicyError::WildcardDnsName { .. }
        ));
    }

    #[test]
    fn limits_and_identity() {
        assert!(matches!(
            check_with(|r| r.duration = Duration::from_secs(599)).unwrap_err(),
            PolicyError::DurationTooShort { .. }
        ));
        assert!(matches!(
            check_with(|r| r.duration = Duration::from_secs(91 * 86400)).unwrap_err(),
            PolicyError::DurationTooLong { .. }
        ));
        assert!(matches!(
            check_with(|r| r.dns_names = (0..33).map(|i| format!("h{i}.example")).collect())
                .unwrap_err(),
            PolicyError::TooManyDnsNames { count: 33, max: 32 }
        ));
        assert!(matches!(
            check_with(|r| r.ip_addresses = vec!["::1".parse().unwrap(); 17]).unwrap_err(),
            PolicyError::TooManyIpAddresses { count: 17, max: 16 }
        ));
        assert_eq!(
            check_with(|r| r.identity.uid.clear()).unwrap_err(),
            PolicyError::EmptyIdentityField { field: "uid" }
        );
        assert!(matches!(
            check_with(|r| r.identity.namespace = "a/sa/b".into()).unwrap_err(),
            PolicyError::InvalidIdentityField {
                field: "namespace",
                ..
            }
        ));
        assert!(matches!(
            check_with(|r| r.common_name = Some(String::new())).unwrap_err(),
            PolicyError::InvalidCommonName { .. }
        ));
    }

    #[test]
    fn policy_validation() {
        assert!(Policy::new("cluster.local").validate().is_ok());
        assert!(Policy::new("").validate().is_err());
        assert!(Policy::new("Cluster.local").validate().is_err());
        assert!(Policy::new("cluster.local:8080").validate().is_err());
        let mut p = Policy::new("cluster.local");
        p.min_duration = p.max_duration + Duration::from_secs(1);
        assert!(p.validate().is_err());
        let mut p = Policy::new("cluster.local");
        p.allowed_key_types.clear();
        assert!(p.validate().is_err());
    }
}
