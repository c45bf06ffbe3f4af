//! Parsing of the volume context: credlet's `credlet.io/` attributes, the
//! pod information the kubelet adds (`podInfoOnMount`) and the service
//! account tokens (`tokenRequests`).
//!
//! Everything here is pure and runs before anything touches the disk.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use credlet_ca::{KeyType, PodIdentity, Template, TemplateError, TemplateVars, expand_template};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::error::InputError;
use crate::paths::{check_file_name, printable};

/// Prefix of every attribute credlet reads.
pub const PREFIX: &str = "credlet.io/";

/// SPIFFE ID template.
pub const SPIFFE_ID: &str = "credlet.io/spiffe-id";
/// Comma-separated DNS SAN templates.
pub const DNS_NAMES: &str = "credlet.io/dns-names";
/// Comma-separated IP SANs.
pub const IP_ADDRESSES: &str = "credlet.io/ip-addresses";
/// Subject common name template.
pub const COMMON_NAME: &str = "credlet.io/common-name";
/// Certificate lifetime.
pub const DURATION: &str = "credlet.io/duration";
/// When to renew: a duration before expiry or a percentage of the lifetime.
pub const RENEW_BEFORE: &str = "credlet.io/renew-before";
/// Key type.
pub const KEY_TYPE: &str = "credlet.io/key-type";
/// File name of the certificate chain.
pub const CERTIFICATE_FILE: &str = "credlet.io/certificate-file";
/// File name of the private key.
pub const KEY_FILE: &str = "credlet.io/key-file";
/// File name of the trust bundle.
pub const CA_FILE: &str = "credlet.io/ca-file";
/// File name of the optional key-then-chain credential bundle.
pub const CREDENTIAL_BUNDLE_FILE: &str = "credlet.io/credential-bundle-file";
/// Group owning the files.
pub const FS_GROUP: &str = "credlet.io/fs-group";

const KNOWN: [&str; 12] = [
    SPIFFE_ID,
    DNS_NAMES,
    IP_ADDRESSES,
    COMMON_NAME,
    DURATION,
    RENEW_BEFORE,
    KEY_TYPE,
    CERTIFICATE_FILE,
    KEY_FILE,
    CA_FILE,
    CREDENTIAL_BUNDLE_FILE,
    FS_GROUP,
];

/// Kubelet-provided pod name.
pub const POD_NAME: &str = "csi.storage.k8s.io/pod.name";
/// Kubelet-provided pod namespace.
pub const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
/// Kubelet-provided pod UID.
pub const POD_UID: &str = "csi.storage.k8s.io/pod.uid";
/// Kubelet-provided service account name.
pub const SERVICE_ACCOUNT_NAME: &str = "csi.storage.k8s.io/serviceAccount.name";
/// Kubelet-provided tokens: JSON map audience → {token, expirationTimestamp}.
pub const SERVICE_ACCOUNT_TOKENS: &str = "csi.storage.k8s.io/serviceAccount.tokens";

/// Largest value of one attribute.
pub const MAX_VALUE_LEN: usize = 4096;
/// Largest token map (several audiences of ~1–2 KiB JWTs).
pub const MAX_TOKENS_LEN: usize = 32 * 1024;
/// Largest whole volume context.
pub const MAX_CONTEXT_LEN: usize = 64 * 1024;
/// Most DNS names per certificate.
pub const MAX_DNS_NAMES: usize = 32;
/// Most IP addresses per certificate.
pub const MAX_IP_ADDRESSES: usize = 16;
/// Default certificate lifetime.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(24 * 3600);
/// Default SPIFFE ID template.
pub const DEFAULT_SPIFFE_ID: &str =
    "spiffe://$TRUST_DOMAIN/ns/$POD_NAMESPACE/sa/$SERVICE_ACCOUNT_NAME";

/// When a certificate is renewed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RenewBefore {
    /// At a random point between 50 % and 70 % of the lifetime.
    Default,
    /// This long before expiry (minus a little jitter).
    Duration(Duration),
    /// When this share (0 < f < 1) of the lifetime is left.
    Fraction(f64),
}

/// Names of the files written into the volume. The defaults are borrowed,
/// so the usual volume allocates none of them (they are kept for every
/// volume the agent manages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileNames {
    /// Leaf then intermediates, PEM.
    pub certificate: Cow<'static, str>,
    /// PKCS#8 private key, PEM.
    pub key: Cow<'static, str>,
    /// Trust bundle, PEM.
    pub ca: Cow<'static, str>,
    /// Optional key-then-chain bundle.
    pub credential_bundle: Option<String>,
}

impl FileNames {
    /// All names, in write order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        [&self.key, &self.certificate, &self.ca]
            .into_iter()
            .map(|name| name.as_ref())
            .chain(self.credential_bundle.as_deref())
    }
}

/// The parsed `credlet.io/` attributes of a volume, templates not yet
/// expanded.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumeAttributes {
    /// SPIFFE ID template (the default is borrowed).
    pub spiffe_id: Cow<'static, str>,
    /// DNS SAN templates.
    pub dns_names: Vec<String>,
    /// IP SANs.
    pub ip_addresses: Vec<IpAddr>,
    /// Common name template.
    pub common_name: Option<String>,
    /// Requested lifetime.
    pub duration: Duration,
    /// Renewal point.
    pub renew_before: RenewBefore,
    /// Key type.
    pub key_type: KeyType,
    /// File names.
    pub files: FileNames,
    /// Group owning the files, from the attribute.
    pub fs_group: Option<u32>,
}

impl VolumeAttributes {
    /// Parses the `credlet.io/` attributes of a volume context. Unknown keys
    /// under the prefix are an error; keys outside it are ignored.
    pub fn parse<'a>(
        context: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Result<Self, InputError> {
        let mut raw: BTreeMap<&str, &str> = BTreeMap::new();
        for (key, value) in context {
            if let Some(known) = KNOWN.iter().find(|k| **k == key.as_str()) {
                raw.insert(known, value.as_str());
            } else if key.starts_with(PREFIX) {
                return Err(InputError::UnknownAttribute {
                    key: printable(key),
                });
            }
        }
        let get = |key: &str| raw.get(key).copied().map(str::trim);

        let spiffe_id = match get(SPIFFE_ID) {
            Some(v) if !v.is_empty() => {
                check_template(SPIFFE_ID, v)?;
                Cow::Owned(v.to_owned())
            }
            _ => Cow::Borrowed(DEFAULT_SPIFFE_ID),
        };
        let dns_names = split_list(get(DNS_NAMES));
        if dns_names.len() > MAX_DNS_NAMES {
            return Err(attr(DNS_NAMES, format!("more than {MAX_DNS_NAMES} names")));
        }
        for name in &dns_names {
            check_template(DNS_NAMES, name)?;
        }
        let ip_addresses = split_list(get(IP_ADDRESSES))
            .into_iter()
            .map(|ip| {
                IpAddr::from_str(&ip).map_err(|_| {
                    attr(
                        IP_ADDRESSES,
                        format!("{:?} is not an IP address", printable(&ip)),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if ip_addresses.len() > MAX_IP_ADDRESSES {
            return Err(attr(
                IP_ADDRESSES,
                format!("more than {MAX_IP_ADDRESSES} addresses"),
            ));
        }
        let common_name = match get(COMMON_NAME) {
            Some(v) if !v.is_empty() => {
                check_template(COMMON_NAME, v)?;
                Some(v.to_owned())
            }
            _ => None,
        };
        let duration = match get(DURATION) {
            Some(v) => parse_duration(v).map_err(|reason| attr(DURATION, reason))?,
            None => DEFAULT_DURATION,
        };
        let renew_before = match get(RENEW_BEFORE) {
            None => RenewBefore::Default,
            Some(v) => {
                parse_renew_before(v, duration).map_err(|reason| attr(RENEW_BEFORE, reason))?
            }
        };
        let key_type = match get(KEY_TYPE) {
            None => KeyType::default(),
            Some(v) => KeyType::from_str(v).map_err(|e| attr(KEY_TYPE, e.to_string()))?,
        };
        let file =
            |key: &'static str, default: &'static str| -> Result<Cow<'static, str>, InputError> {
                match get(key) {
                    None => Ok(Cow::Borrowed(default)),
                    Some(name) => {
                        check_file_name(key, name)?;
                        Ok(Cow::Owned(name.to_owned()))
                    }
                }
            };
        let files = FileNames {
            certificate: file(CERTIFICATE_FILE, "tls.crt")?,
            key: file(KEY_FILE, "tls.key")?,
            ca: file(CA_FILE, "ca.crt")?,
            credential_bundle: match get(CREDENTIAL_BUNDLE_FILE) {
                None => None,
                Some(name) => {
                    check_file_name(CREDENTIAL_BUNDLE_FILE, name)?;
                    Some(name.to_owned())
                }
            },
        };
        let names: Vec<&str> = files.iter().collect();
        for (i, name) in names.iter().enumerate() {
            if names[..i].contains(name) {
                return Err(attr(
                    CERTIFICATE_FILE,
                    format!("file name {name:?} is used for two files"),
                ));
            }
        }
        let fs_group = match get(FS_GROUP) {
            None => None,
            Some(v) => Some(parse_gid(v).map_err(|reason| attr(FS_GROUP, reason))?),
        };
        Ok(Self {
            spiffe_id,
            dns_names,
            ip_addresses,
            common_name,
            duration,
            renew_before,
            key_type,
            files,
            fs_group,
        })
    }

    /// Expands the templates for a pod.
    pub fn expand(
        &self,
        pod: &PodIdentity,
        trust_domain: &str,
    ) -> Result<ExpandedNames, InputError> {
        let vars = TemplateVars::new(pod, trust_domain);
        let expand = |key: &'static str, template: &str| {
            expand_template(template, &vars).map_err(|e| template_error(key, template, &e))
        };
        Ok(ExpandedNames {
            spiffe_id: expand(SPIFFE_ID, &self.spiffe_id)?,
            dns_names: self
                .dns_names
                .iter()
                .map(|t| expand(DNS_NAMES, t))
                .collect::<Result<_, _>>()?,
            common_name: self
                .common_name
                .as_deref()
                .map(|t| expand(COMMON_NAME, t))
                .transpose()?,
        })
    }
}

/// Names after template expansion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpandedNames {
    /// The SPIFFE ID.
    pub spiffe_id: String,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// Common name.
    pub common_name: Option<String>,
}

fn attr(key: &'static str, reason: impl Into<String>) -> InputError {
    InputError::Attribute {
        key,
        reason: reason.into(),
    }
}

fn split_list(value: Option<&str>) -> Vec<String> {
    value
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Checks a template's syntax with the grammar the CA expands it with.
fn check_template(key: &'static str, template: &str) -> Result<(), InputError> {
    Template::parse(template)
        .map(drop)
        .map_err(|e| template_error(key, template, &e))
}

fn template_error(key: &'static str, template: &str, error: &TemplateError) -> InputError {
    attr(
        key,
        format!("invalid template {:?}: {error}", printable(template)),
    )
}

/// Parses a Go-style duration made of `h`, `m` and `s` parts: `90s`,
/// `45m`, `1h30m`. At least one second, at most ten years.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let err = || {
        format!(
            "{:?} is not a duration like 90s, 45m, 24h or 1h30m",
            printable(value)
        )
    };
    if value.is_empty() {
        return Err(err());
    }
    let mut total: u64 = 0;
    let mut rest = value;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
        if digits == 0 || digits > 9 {
            return Err(err());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| err())?;
        let unit = match rest.as_bytes()[digits] {
            b'h' => 3600,
            b'm' => 60,
            b's' => 1,
            _ => return Err(err()),
        };
        total = total
            .checked_add(number.checked_mul(unit).ok_or_else(err)?)
            .ok_or_else(err)?;
        rest = &rest[digits + 1..];
    }
    if total == 0 || total > 10 * 365 * 24 * 3600 {
        return Err(format!(
            "{:?} must be between 1s and ten years",
            printable(value)
        ));
    }
    Ok(Duration::from_secs(total))
}

fn parse_renew_before(value: &str, duration: Duration) -> Result<RenewBefore, String> {
    if let Some(percent) = value.strip_suffix('%') {
        let p: f64 = percent
            .trim()
            .parse()
            .map_err(|_| format!("{:?} is not a percentage", printable(value)))?;
        if !(p > 0.0 && p < 100.0) {
            return Err("percentage must be between 0 and 100, exclusive".into());
        }
        return Ok(RenewBefore::Fraction(p / 100.0));
    }
    let d = parse_duration(value)?;
    if d >= duration {
        return Err(format!(
            "{value} is not shorter than the certificate duration ({}s)",
            duration.as_secs()
        ));
    }
    Ok(RenewBefore::Duration(d))
}

fn parse_gid(value: &str) -> Result<u32, String> {
    value
        .parse::<u32>()
        .ok()
        .filter(|g| *g < u32::MAX)
        .ok_or_else(|| format!("{:?} is not a numeric group id", printable(value)))
}

/// Parses the group the kubelet sends as `volume_mount_group`.
pub fn parse_volume_mount_group(value: &str) -> Result<Option<u32>, InputError> {
    if value.is_empty() {
        return Ok(None);
    }
    parse_gid(value)
        .map(Some)
        .map_err(|_| InputError::Capability {
            reason: "volume_mount_group is not a numeric group id",
        })
}

/// Reads the pod identity the kubelet adds with `podInfoOnMount: true`.
pub fn parse_pod_identity(context: &HashMap<String, String>) -> Result<PodIdentity, InputError> {
    let get = |field: &'static str, check: fn(&str) -> bool| -> Result<String, InputError> {
        match context.get(field) {
            Some(v) if check(v) => Ok(v.clone()),
            _ => Err(InputError::PodInfo { field }),
        }
    };
    Ok(PodIdentity {
        name: get(POD_NAME, is_dns_subdomain)?,
        namespace: get(POD_NAMESPACE, is_dns_label)?,
        uid: get(POD_UID, is_uid)?,
        service_account: get(SERVICE_ACCOUNT_NAME, is_dns_subdomain)?,
    })
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn is_uid(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Checks sizes of the whole context before any parsing.
pub fn check_context_size(context: &HashMap<String, String>) -> Result<(), InputError> {
    let mut total = 0usize;
    for (key, value) in context {
        let max = if key == SERVICE_ACCOUNT_TOKENS {
            MAX_TOKENS_LEN
        } else {
            MAX_VALUE_LEN
        };
        if value.len() > max || key.len() > 512 {
            return Err(InputError::AttributeTooLarge {
                key: printable(key),
                len: value.len().max(key.len()),
                max,
            });
        }
        total += key.len() + value.len();
    }
    if total > MAX_CONTEXT_LEN {
        return Err(InputError::ContextTooLarge {
            len: total,
            max: MAX_CONTEXT_LEN,
        });
    }
    Ok(())
}

/// A service account token for one audience. Never printed.
#[derive(Clone)]
pub struct ServiceAccountToken {
    /// The JWT.
    pub token: Zeroizing<String>,
    /// When it expires, if the kubelet said.
    pub expires: Option<SystemTime>,
}

impl ServiceAccountToken {
    /// Whether the kubelet's expiry (if it gave one) lies after `at`.
    pub fn valid_at(&self, at: SystemTime) -> bool {
        self.expires.is_none_or(|expires| expires > at)
    }
}

impl fmt::Debug for ServiceAccountToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccountToken")
            .field("token", &"<redacted>")
            .field("expires", &self.expires)
            .finish()
    }
}

#[derive(Deserialize)]
struct TokenEntry {
    token: Zeroizing<String>,
    #[serde(rename = "expirationTimestamp")]
    expiration_timestamp: Option<String>,
}

/// Reads the token for `audience` from the kubelet's token map. `Ok(None)`
/// when the map is absent or has no entry for the audience.
pub fn parse_token(
    context: &HashMap<String, String>,
    audience: &str,
) -> Result<Option<ServiceAccountToken>, InputError> {
    let Some(raw) = context.get(SERVICE_ACCOUNT_TOKENS) else {
        return Ok(None);
    };
    if raw.is_empty() {
        return Ok(None);
    }
    let mut map: HashMap<String, TokenEntry> =
        serde_json::from_str(raw).map_err(|e| InputError::Tokens {
            reason: format!(
                "not a JSON map of audience to token: line {} column {}",
                e.line(),
                e.column()
            ),
        })?;
    let Some(entry) = map.remove(audience) else {
        return Ok(None);
    };
    if entry.token.is_empty() {
        return Err(InputError::Tokens {
            reason: format!("token for audience {audience:?} is empty"),
        });
    }
    let expires = match entry.expiration_timestamp.as_deref() {
        None | Some("") => None,
        Some(ts) => Some(parse_rfc3339(ts).ok_or_else(|| InputError::Tokens {
            reason: format!("expirationTimestamp {:?} is not RFC 3339", printable(ts)),
        })?),
    };
    Ok(Some(ServiceAccountToken {
        token: entry.token,
        expires,
    }))
}

fn parse_rfc3339(ts: &str) -> Option<SystemTime> {
    let parsed =
        time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).ok()?;
    Some(parsed.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn pod() -> PodIdentity {
        PodIdentity {
            namespace: "shop".into(),
            name: "web-7d9f".into(),
            uid: "0f1e2d3c-aaaa-bbbb-cccc-111122223333".into(),
            service_account: "web".into(),
        }
    }

    #[test]
    fn defaults() {
        let a = VolumeAttributes::parse(&ctx(&[("other.io/x", "y")])).expect("parse");
        assert_eq!(a.duration, DEFAULT_DURATION);
        assert_eq!(a.renew_before, RenewBefore::Default);
        assert_eq!(a.key_type, KeyType::EcdsaP256);
        assert_eq!(a.files.certificate, "tls.crt");
        assert_eq!(a.files.key, "tls.key");
        assert_eq!(a.files.ca, "ca.crt");
        assert_eq!(a.files.credential_bundle, None);
        let names = a.expand(&pod(), "cluster.local").expect("expand");
        assert_eq!(names.spiffe_id, "spiffe://cluster.local/ns/shop/sa/web");
        assert!(names.dns_names.is_empty());
    }

    #[test]
    fn full_set_and_templates() {
        let a = VolumeAttributes::parse(&ctx(&[
            (
                DNS_NAMES,
                "$POD_NAME.$POD_NAMESPACE.svc, ${SERVICE_ACCOUNT_NAME}.internal,,${POD_NAME}.${POD_NAMESPACE}.$TRUST_DOMAIN",
            ),
            (IP_ADDRESSES, "10.0.0.1, ::1"),
            (COMMON_NAME, "$POD_UID"),
            (DURATION, "1h30m"),
            (RENEW_BEFORE, "25%"),
            (KEY_TYPE, "ed25519"),
            (CREDENTIAL_BUNDLE_FILE, "bundle.pem"),
            (FS_GROUP, "2000"),
            (
                SPIFFE_ID,
                "spiffe://$TRUST_DOMAIN/ns/$POD_NAMESPACE/sa/$SERVICE_ACCOUNT_NAME/x",
            ),
        ]))
        .expect("parse");
        assert_eq!(a.duration, Duration::from_secs(5400));
        assert_eq!(a.renew_before, RenewBefore::Fraction(0.25));
        assert_eq!(a.key_type, KeyType::Ed25519);
        assert_eq!(a.ip_addresses.len(), 2);
        assert_eq!(a.fs_group, Some(2000));
        let names = a.expand(&pod(), "td.example").expect("expand");
        assert_eq!(
            names.dns_names,
            [
                "web-7d9f.shop.svc",
                "web.internal",
                "web-7d9f.shop.td.example"
            ]
        );
        assert_eq!(
            names.common_name.as_deref(),
            Some("0f1e2d3c-aaaa-bbbb-cccc-111122223333")
        );
        assert_eq!(names.spiffe_id, "spiffe://td.example/ns/shop/sa/web/x");
    }

    #[test]
    fn rejections() {
        let cases: &[(&str, &str)] = &[
            ("credlet.io/dns-name", "typo"),
            (DNS_NAMES, "$HOSTNAME.example"),
            (DNS_NAMES, "${POD_NAME"),
            (DNS_NAMES, "${}.example"),
            (DNS_NAMES, "web$"),
            (SPIFFE_ID, "spiffe://$TRUST_DOMAIN/ns/$NAMESPACE/sa/x"),
            (COMMON_NAME, "$pod_name"),
            (COMMON_NAME, "a\nb"),
            (IP_ADDRESSES, "10.0.0.300"),
            (DURATION, "1d"),
            (DURATION, "0s"),
            (DURATION, "-5m"),
            (DURATION, "h"),
            (DURATION, "99999999999h"),
            (RENEW_BEFORE, "48h"),
            (RENEW_BEFORE, "100%"),
            (RENEW_BEFORE, "0%"),
            (RENEW_BEFORE, "x%"),
            (KEY_TYPE, "RSA2048"),
            (KEY_TYPE, "RSA3072"),
            (CERTIFICATE_FILE, "../etc/passwd"),
            (KEY_FILE, "a/b"),
            (CA_FILE, "..data"),
            (CREDENTIAL_BUNDLE_FILE, ""),
            (KEY_FILE, "tls.crt"),
            (FS_GROUP, "-1"),
            (FS_GROUP, "staff"),
        ];
        for (key, value) in cases {
            let result = VolumeAttributes::parse(&ctx(&[(key, value)]));
            assert!(result.is_err(), "{key}={value:?} accepted");
        }
        let many = vec!["a.example"; 33].join(",");
        assert!(VolumeAttributes::parse(&ctx(&[(DNS_NAMES, &many)])).is_err());
    }

    #[test]
    fn template_errors_name_the_attribute_the_template_and_the_variables() {
        let err = VolumeAttributes::parse(&ctx(&[(DNS_NAMES, "a.example, $HOSTNAME.example")]))
            .expect_err("unknown variable");
        let message = err.to_string();
        for part in [DNS_NAMES, "$HOSTNAME.example", "$POD_NAME", "$TRUST_DOMAIN"] {
            assert!(message.contains(part), "{message}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1h1m1s"), Ok(Duration::from_secs(3661)));
        for bad in ["", "1", "1x", "1h 1m", "1.5h", "s", "1hh"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn pod_identity() {
        let good = ctx(&[
            (POD_NAME, "web-0"),
            (POD_NAMESPACE, "shop"),
            (POD_UID, "0f1e2d3c-aaaa"),
            (SERVICE_ACCOUNT_NAME, "default"),
        ]);
        let id = parse_pod_identity(&good).expect("valid");
        assert_eq!(id.name, "web-0");
        for (key, bad) in [
            (POD_NAME, ""),
            (POD_NAMESPACE, "Shop"),
            (POD_NAMESPACE, "a.b"),
            (POD_UID, "x/y"),
            (SERVICE_ACCOUNT_NAME, "$x"),
        ] {
            let mut c = good.clone();
            c.insert(key.into(), bad.into());
            assert!(parse_pod_identity(&c).is_err(), "{key}={bad:?} accepted");
        }
        let mut missing = good.clone();
        missing.remove(POD_UID);
        assert!(parse_pod_identity(&missing).is_err());
    }

    #[test]
    fn tokens() {
        let c = ctx(&[(
            SERVICE_ACCOUNT_TOKENS,
            r#"{"credlet":{"token":"eyJhbGc.secret.sig","expirationTimestamp":"2026-11-27T12:00:00Z"},"other":{"token":"x"}}"#,
        )]);
        let t = parse_token(&c, "credlet").expect("parse").expect("present");
        assert_eq!(t.token.as_str(), "eyJhbGc.secret.sig");
        assert!(t.expires.is_some());
        assert!(!format!("{t:?}").contains("secret"));
        assert!(parse_token(&c, "missing").expect("parse").is_none());
        assert!(parse_token(&ctx(&[]), "credlet").expect("parse").is_none());
        let bad = ctx(&[(SERVICE_ACCOUNT_TOKENS, "{not json")]);
        let err = parse_token(&bad, "credlet").expect_err("malformed");
        assert!(!err.to_string().contains("not json"));
        let bad_ts = ctx(&[(
            SERVICE_ACCOUNT_TOKENS,
            r#"{"credlet":{"token":"x","expirationTimestamp":"tomorrow"}}"#,
        )]);
        assert!(parse_token(&bad_ts, "credlet").is_err());
    }

    #[test]
    fn context_size_limits() {
        let big = "x".repeat(MAX_VALUE_LEN + 1);
        assert!(check_context_size(&ctx(&[(DNS_NAMES, &big)])).is_err());
        let tokens = "x".repeat(MAX_VALUE_LEN + 1);
        assert!(check_context_size(&ctx(&[(SERVICE_ACCOUNT_TOKENS, &tokens)])).is_ok());
        let mut many = HashMap::new();
        for i in 0..40 {
            many.insert(format!("k{i}"), "y".repeat(2000));
        }
        assert!(check_context_size(&many).is_err());
    }
}
