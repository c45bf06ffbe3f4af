//! The CA service's issuance policy: which names a pod may get, how long
//! certificates live, who counts as the agent, and when to renew.
//!
//! Names come only from verified facts: the pod's namespace, name, uid and
//! service account as the API server vouched for them in the TokenReview
//! (and the pod check), and the CA's own trust domain. Requested names are
//! templates ([`credlet_ca::Template`], the grammar the agent checks volume
//! attributes with) expanded from those facts; DNS names are then matched
//! against the allowed templates.
//!
//! SPIFFE IDs:
//! - pods: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`,
//!   or a path below it the pod asks for;
//! - agent client certificates: `spiffe://<trust-domain>/credlet/node/<node>`
//!   (the `credlet/` path can never be a pod's, whose paths start `ns/`);
//! - the CA's own serving certificate: `spiffe://<trust-domain>/credlet/ca`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use credlet_ca::{PodIdentity, PolicyError, Template, TemplateVars};

use crate::error::Error;
use crate::tls::ServerNames;
use crate::tokens::VerifiedToken;

/// The verified facts templates expand from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod_name: String,
    /// The pod's uid.
    pub pod_uid: String,
    /// The pod's service account.
    pub service_account: String,
}

impl Facts {
    /// The template variables for these facts in `trust_domain`.
    pub fn vars<'a>(&'a self, trust_domain: &'a str) -> TemplateVars<'a> {
        TemplateVars {
            pod_name: &self.pod_name,
            pod_namespace: &self.namespace,
            pod_uid: &self.pod_uid,
            service_account_name: &self.service_account,
            trust_domain,
        }
    }

    fn pod(&self) -> String {
        format!("{}/{}", self.namespace, self.pod_name)
    }
}

impl From<&VerifiedToken> for Facts {
    fn from(token: &VerifiedToken) -> Self {
        Self {
            namespace: token.namespace.clone(),
            pod_name: token.pod_name.clone(),
            pod_uid: token.pod_uid.clone(),
            service_account: token.service_account.clone(),
        }
    }
}

/// Parses a requested template; a bad one is the requester's error.
fn parse_template(template: &str) -> Result<Template, Error> {
    Template::parse(template).map_err(|e| Error::InvalidTemplate {
        template: template.to_owned(),
        reason: e.to_string(),
    })
}

/// An allowed DNS name: an exact template (`$POD_NAME.$POD_NAMESPACE.svc`)
/// or `*.` + a template suffix, matching exactly one more DNS label in
/// front of the expanded suffix (`*.$POD_NAMESPACE.svc.cluster.local`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsPattern {
    pattern: String,
    /// Whether the pattern starts `*.`.
    wildcard: bool,
    /// The pattern after any `*.`.
    body: Template,
}

impl DnsPattern {
    /// Parses and checks a pattern: it must expand (with sample facts) to a
    /// valid host name.
    pub fn parse(pattern: &str) -> Result<Self, Error> {
        let invalid = |reason: String| Error::InvalidTemplate {
            template: pattern.to_owned(),
            reason,
        };
        let (wildcard, body) = match pattern.strip_prefix("*.") {
            Some(body) => (true, body),
            None => (false, pattern),
        };
        let body = Template::parse(body).map_err(|e| invalid(e.to_string()))?;
        let sample = TemplateVars {
            pod_name: "pod",
            pod_namespace: "ns",
            pod_uid: "0b7d3c36-7ad9-4cf1-9f0c-3d5a7c1f2e10",
            service_account_name: "sa",
            trust_domain: "cluster.local",
        };
        if !is_host_name(&body.expand(&sample)) {
            return Err(invalid(
                "does not expand to a host name (labels of letters, digits and '-', no other wildcard)"
                    .to_owned(),
            ));
        }
        Ok(Self {
            pattern: pattern.to_owned(),
            wildcard,
            body,
        })
    }

    /// The pattern as configured.
    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    /// Whether `name` (already expanded, lowercase) is allowed for the pod
    /// `vars` describe.
    pub fn matches(&self, name: &str, vars: &TemplateVars<'_>) -> bool {
        let allowed = self.body.expand(vars);
        if self.wildcard {
            let suffix = allowed.to_ascii_lowercase();
            name.strip_suffix(suffix.as_str())
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.'))
        } else {
            allowed.eq_ignore_ascii_case(name)
        }
    }
}

fn is_host_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// An IP range (CIDR) pods may get IP SANs from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpRange {
    network: IpAddr,
    prefix: u8,
}

impl IpRange {
    /// Parses `a.b.c.d/n` or `x::y/n` (a bare address means one address).
    pub fn parse(text: &str) -> Result<Self, Error> {
        let invalid = |reason: &str| Error::Config {
            reason: format!("IP range {text:?}: {reason}"),
        };
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let network: IpAddr = addr.parse().map_err(|_| invalid("not an IP address"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| invalid("bad prefix length"))?,
            None => max,
        };
        Ok(Self { network, prefix })
    }

    /// Whether `ip` is inside the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        fn bits(ip: IpAddr) -> (u128, u32) {
            match ip {
                IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
                IpAddr::V6(v6) => (u128::from(v6), 128),
            }
        }
        let (net, width) = bits(self.network);
        let (addr, addr_width) = bits(ip);
        if width != addr_width {
            return false;
        }
        let shift = width - u32::from(self.prefix);
        shift >= width || (net >> shift) == (addr >> shift)
    }
}

impl std::fmt::Display for IpRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// A service account, `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccountRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ServiceAccountRef {
    /// Parses `namespace/name`.
    pub fn parse(text: &str) -> Result<Self, Error> {
        match text.split_once('/') {
            Some((ns, name)) if is_host_name(ns) && is_host_name(name) && !ns.contains('.') => {
                Ok(Self {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(Error::Config {
                reason: format!("service account {text:?} must be <namespace>/<name>"),
            }),
        }
    }
}

impl std::fmt::Display for ServiceAccountRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The CA service's policy.
#[derive(Clone, Debug)]
pub struct ServicePolicy {
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Longest lifetime; longer requests are shortened to it.
    pub max_duration: Duration,
    /// Shortest lifetime; shorter requests are lengthened to it.
    pub min_duration: Duration,
    /// Lifetime when a request asks for none.
    pub default_duration: Duration,
    /// Lifetime of agent client certificates (capped by `max_duration`).
    pub agent_duration: Duration,
    /// Allowed DNS SAN patterns for every namespace without an override.
    pub dns_patterns: Vec<DnsPattern>,
    /// Per-namespace DNS SAN patterns; replace `dns_patterns` there.
    pub namespace_dns_patterns: BTreeMap<String, Vec<DnsPattern>>,
    /// Ranges IP SANs may come from; none by default.
    pub ip_ranges: Vec<IpRange>,
    /// The agent's service account.
    pub agent_service_account: ServiceAccountRef,
    /// Share of the lifetime left when renewal begins, by default (percent).
    pub default_renew_before_percent: u32,
    /// Width of the window renewal points are drawn from, in percent of
    /// the lifetime on each side of the nominal point (default 10: renewal
    /// at 50–70 %); 0 turns spreading off.
    pub renewal_spread_percent: u32,
    /// The CA's own server names (`--server-name`), never issued to a pod:
    /// agents dial the CA by one of them, so a pod holding one could pose
    /// as the CA (agents also require the CA's SPIFFE ID; this keeps the
    /// names themselves out of pods' reach). [`crate::Settings::new`] fills
    /// it in.
    pub ca_names: ServerNames,
}

impl ServicePolicy {
    /// Defaults for `trust_domain`: 24 h default / 90 days max / 1 h min
    /// lifetime, 24 h agent certificates, no DNS or IP SANs, agent service
    /// account `credlet-system/credlet-agent`, renewal when 40 % of the lifetime is
    /// left (spread over ±10 % of the lifetime: at 50–70 %).
    pub fn new(trust_domain: impl Into<String>) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            max_duration: credlet_ca::Policy::DEFAULT_MAX_DURATION,
            min_duration: Duration::from_secs(3600),
            default_duration: Duration::from_secs(24 * 3600),
            agent_duration: Duration::from_secs(24 * 3600),
            dns_patterns: Vec::new(),
            namespace_dns_patterns: BTreeMap::new(),
            ip_ranges: Vec::new(),
            agent_service_account: ServiceAccountRef {
                namespace: "credlet-system".into(),
                name: "credlet-agent".into(),
            },
            default_renew_before_percent: 40,
            renewal_spread_percent: DEFAULT_RENEWAL_SPREAD_PERCENT,
            ca_names: ServerNames::default(),
        }
    }

    /// Adds a `--dns-template` value: `pattern` (every namespace) or
    /// `namespace=pattern` (that namespace only, replacing the node-wide
    /// list there).
    pub fn add_dns_template(&mut self, flag: &str) -> Result<(), Error> {
        match flag.split_once('=') {
            Some((ns, pattern)) => {
                if !is_host_name(ns) || ns.contains('.') {
                    return Err(Error::Config {
                        reason: format!("--dns-template {flag:?}: {ns:?} is not a namespace"),
                    });
                }
                let pattern = DnsPattern::parse(pattern)?;
                self.namespace_dns_patterns
                    .entry(ns.to_owned())
                    .or_default()
                    .push(pattern);
            }
            None => self.dns_patterns.push(DnsPattern::parse(flag)?),
        }
        Ok(())
    }

    /// The policy handed to the issuance library.
    pub fn ca_policy(&self) -> credlet_ca::Policy {
        let mut policy = credlet_ca::Policy::new(self.trust_domain.clone());
        policy.min_duration = self.min_duration.min(Duration::from_secs(600));
        policy.max_duration = self.max_duration;
        policy
    }

    /// Checks the policy's own consistency.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |reason: String| Error::Config { reason };
        if self.min_duration > self.max_duration || self.max_duration.is_zero() {
            return Err(bad(format!(
                "lifetime bounds [{:?}, {:?}] are empty",
                self.min_duration, self.max_duration
            )));
        }
        if !(1..=99).contains(&self.default_renew_before_percent) {
            return Err(bad("renewal percentage must be 1-99".into()));
        }
        if self.renewal_spread_percent > MAX_RENEWAL_SPREAD_PERCENT {
            return Err(bad(format!(
                "renewal spread {} % is above {MAX_RENEWAL_SPREAD_PERCENT} %",
                self.renewal_spread_percent
            )));
        }
        Ok(())
    }

    fn patterns_for(&self, namespace: &str) -> &[DnsPattern] {
        self.namespace_dns_patterns
            .get(namespace)
            .unwrap_or(&self.dns_patterns)
    }

    /// Expands the requested DNS templates from `facts` and checks each
    /// against the allowed patterns.
    pub fn dns_names(&self, facts: &Facts, templates: &[String]) -> Result<Vec<String>, Error> {
        let vars = facts.vars(&self.trust_domain);
        let patterns = self.patterns_for(&facts.namespace);
        let mut names: Vec<String> = Vec::with_capacity(templates.len());
        for template in templates {
            let name = parse_template(template)?.expand(&vars).to_ascii_lowercase();
            if self.ca_names.dns_names.contains(&name) {
                return Err(Error::SanReservedForCa {
                    pod: facts.pod(),
                    kind: "DNS",
                    template: template.clone(),
                    value: name,
                });
            }
            if !patterns.iter().any(|p| p.matches(&name, &vars)) {
                return Err(Error::SanNotAllowed {
                    pod: facts.pod(),
                    kind: "DNS",
                    template: template.clone(),
                    value: name,
                    allowed: describe(patterns.iter().map(DnsPattern::as_str)),
                });
            }
            if !names.contains(&name) {
                names.push(name);
            }
        }
        Ok(names)
    }

    /// Parses the requested IP SANs and checks each against the allowed
    /// ranges.
    pub fn ip_addresses(&self, facts: &Facts, requested: &[String]) -> Result<Vec<IpAddr>, Error> {
        requested
            .iter()
            .map(|text| {
                let ip: IpAddr = text.parse().map_err(|_| Error::InvalidField {
                    field: "ip_addresses",
                    reason: format!("{text:?} is not an IP address"),
                })?;
                // `::ffff:a.b.c.d` is the CA's `a.b.c.d` too.
                if self
                    .ca_names
                    .ip_addresses
                    .iter()
                    .any(|own| own.to_canonical() == ip.to_canonical())
                {
                    return Err(Error::SanReservedForCa {
                        pod: facts.pod(),
                        kind: "IP",
                        template: text.clone(),
                        value: ip.to_string(),
                    });
                }
                if self.ip_ranges.iter().any(|r| r.contains(ip)) {
                    Ok(ip)
                } else {
                    Err(Error::SanNotAllowed {
                        pod: facts.pod(),
                        kind: "IP",
                        template: text.clone(),
                        value: ip.to_string(),
                        allowed: describe(self.ip_ranges.iter().map(ToString::to_string)),
                    })
                }
            })
            .collect()
    }

    /// The subject common name: empty template means none; otherwise it
    /// must expand to one of the certificate's (allowed) DNS names or to the
    /// pod's name.
    pub fn common_name(
        &self,
        facts: &Facts,
        template: &str,
        dns_names: &[String],
    ) -> Result<Option<String>, Error> {
        if template.is_empty() {
            return Ok(None);
        }
        let cn = parse_template(template)?.expand(&facts.vars(&self.trust_domain));
        if cn == facts.pod_name || dns_names.iter().any(|n| n.eq_ignore_ascii_case(&cn)) {
            Ok(Some(cn))
        } else {
            Err(Error::SanNotAllowed {
                pod: facts.pod(),
                kind: "common name",
                template: template.to_owned(),
                value: cn,
                allowed: "the pod name or one of the certificate's DNS names".to_owned(),
            })
        }
    }

    /// The SPIFFE ID a pod asks for with `template`, expanded from `facts`:
    /// `None` (the default ID) for an empty template. The ID must pass the
    /// issuance library's rule, the one every issuance path applies (in
    /// this trust domain, at or below the pod's `ns/<ns>/sa/<sa>`); an ID
    /// elsewhere is a SAN the pod is not allowed, like a refused DNS name.
    pub fn spiffe_id(&self, facts: &Facts, template: &str) -> Result<Option<String>, Error> {
        if template.is_empty() {
            return Ok(None);
        }
        let id = parse_template(template)?.expand(&facts.vars(&self.trust_domain));
        let identity = PodIdentity {
            namespace: facts.namespace.clone(),
            name: facts.pod_name.clone(),
            uid: facts.pod_uid.clone(),
            service_account: facts.service_account.clone(),
        };
        match self.ca_policy().check_spiffe_id(&id, &identity) {
            Ok(()) => Ok(Some(id)),
            Err(
                PolicyError::ForeignTrustDomain { .. }
                | PolicyError::SpiffeIdOutsideIdentity { .. },
            ) => Err(Error::SanNotAllowed {
                pod: facts.pod(),
                kind: "URI",
                template: template.to_owned(),
                allowed: format!(
                    "{} or a path below it",
                    self.pod_spiffe_id(&facts.namespace, &facts.service_account)
                ),
                value: id,
            }),
            // Not a SPIFFE ID at all: a malformed request.
            Err(other) => Err(other.into()),
        }
    }

    /// The lifetime to issue: `requested_secs` (0: the default) bounded to
    /// `[min_duration, max_duration]`; a longer request is shortened, not
    /// refused.
    pub fn duration(&self, requested_secs: u64) -> Duration {
        let requested = if requested_secs == 0 {
            self.default_duration
        } else {
            Duration::from_secs(requested_secs)
        };
        requested.clamp(self.min_duration, self.max_duration)
    }

    /// `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn pod_spiffe_id(&self, namespace: &str, service_account: &str) -> String {
        format!(
            "spiffe://{}/ns/{namespace}/sa/{service_account}",
            self.trust_domain
        )
    }

    /// `spiffe://<td>/credlet/node/<node>`: the URI SAN of an agent's client
    /// certificate.
    pub fn node_spiffe_id(&self, node: &str) -> String {
        format!("spiffe://{}/credlet/node/{node}", self.trust_domain)
    }

    /// `spiffe://<td>/credlet/ca`: the URI SAN of the CA's serving
    /// certificate, which agents require (see [`credlet_ca::ca_spiffe_id`]).
    pub fn ca_spiffe_id(&self) -> String {
        credlet_ca::ca_spiffe_id(&self.trust_domain)
    }

    /// The node named by an agent client certificate's URI SAN, if `uri` is
    /// one in this trust domain.
    pub fn node_of_spiffe_id<'u>(&self, uri: &'u str) -> Option<&'u str> {
        uri.strip_prefix("spiffe://")?
            .strip_prefix(self.trust_domain.as_str())?
            .strip_prefix("/credlet/node/")
            .filter(|node| is_host_name(node))
    }
}

/// Whether `node` can be a node name (an RFC 1123 subdomain).
pub fn is_node_name(node: &str) -> bool {
    is_host_name(node) && !node.bytes().any(|b| b.is_ascii_uppercase())
}

fn describe<S: AsRef<str>>(items: impl Iterator<Item = S>) -> String {
    let list: Vec<String> = items.map(|s| format!("{:?}", s.as_ref())).collect();
    if list.is_empty() {
        "none (the CA's policy allows no such SANs)".to_owned()
    } else {
        list.join(", ")
    }
}

/// Default [`ServicePolicy::renewal_spread_percent`].
pub const DEFAULT_RENEWAL_SPREAD_PERCENT: u32 = 10;
/// Largest [`ServicePolicy::renewal_spread_percent`].
pub const MAX_RENEWAL_SPREAD_PERCENT: u32 = 40;

/// When to begin renewal, spread so that certificates issued in the same
/// second do not all renew in the same second: [`renew_at_spread_unix_ms`]
/// with the default spread of ±10 % of the lifetime.
pub fn renew_at_unix_ms(
    not_before: SystemTime,
    not_after: SystemTime,
    renew_before_secs: u64,
    percent: u32,
    default_percent: u32,
) -> i64 {
    renew_at_spread_unix_ms(
        not_before,
        not_after,
        renew_before_secs,
        percent,
        default_percent,
        DEFAULT_RENEWAL_SPREAD_PERCENT,
    )
}

/// When to begin renewal.
///
/// The nominal point is `renew_before_secs` before `not_after`, or else the
/// moment `percent` % of the lifetime is left (`default_percent` when 0).
/// The answer is drawn uniformly from a window of ±`spread_percent` % of
/// the lifetime around that point (for `renew_before_secs`: from that
/// share before the point up to the point), never earlier than 10 % into
/// the lifetime nor later than 1 % before the end. With `spread_percent`
/// 0 it is the nominal point itself. Milliseconds since the epoch.
pub fn renew_at_spread_unix_ms(
    not_before: SystemTime,
    not_after: SystemTime,
    renew_before_secs: u64,
    percent: u32,
    default_percent: u32,
    spread_percent: u32,
) -> i64 {
    let ms = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    };
    let start = ms(not_before);
    let end = ms(not_after).max(start + 1);
    let lifetime = end - start;
    let tenth = lifetime / 10;
    let spread = lifetime * i64::from(spread_percent.min(MAX_RENEWAL_SPREAD_PERCENT)) / 100;
    let (low, high) = if renew_before_secs > 0 {
        let point = end - i64::try_from(renew_before_secs.saturating_mul(1000)).unwrap_or(lifetime);
        (point - spread, point)
    } else {
        let percent = if (1..=99).contains(&percent) {
            percent
        } else {
            default_percent.clamp(1, 99)
        };
        let point = end - lifetime * i64::from(percent) / 100;
        (point - spread, point + spread)
    };
    let floor = start + tenth;
    let ceiling = (end - lifetime / 100).max(floor);
    let low = low.clamp(floor, ceiling);
    let high = high.clamp(low, ceiling);
    fastrand::i64(low..=high)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            namespace: "team-a".into(),
            pod_name: "web-0".into(),
            pod_uid: "uid-1".into(),
            service_account: "web".into(),
        }
    }

    #[test]
    fn requested_templates_use_the_agents_grammar() {
        let mut p = ServicePolicy::new("cluster.local");
        p.add_dns_template("$POD_NAME.$POD_NAMESPACE.svc").unwrap();
        p.add_dns_template("${SERVICE_ACCOUNT_NAME}-$POD_UID.internal")
            .unwrap();
        p.add_dns_template("*.${POD_NAMESPACE}.$TRUST_DOMAIN")
            .unwrap();
        let f = facts();
        let requested = [
            "${POD_NAME}.${POD_NAMESPACE}.svc",
            "$POD_NAME.${POD_NAMESPACE}.svc",
            "$SERVICE_ACCOUNT_NAME-${POD_UID}.internal",
            "api.$POD_NAMESPACE.$TRUST_DOMAIN",
            "API.${POD_NAMESPACE}.${TRUST_DOMAIN}",
        ]
        .map(String::from);
        assert_eq!(
            p.dns_names(&f, &requested).unwrap(),
            [
                "web-0.team-a.svc",
                "web-uid-1.internal",
                "api.team-a.cluster.local"
            ]
        );
        assert_eq!(
            p.common_name(&f, "${POD_NAME}", &[]).unwrap().as_deref(),
            Some("web-0")
        );
        for bad in ["$HOSTNAME.x", "${POD_NAME.svc", "${}.svc", "svc.$", "a\nb"] {
            let err = p.dns_names(&f, &[bad.into()]).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidTemplate { template, .. } if template == bad),
                "{bad:?}: {err}"
            );
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            let err = p.common_name(&f, bad, &[]).unwrap_err();
            assert!(
                matches!(err, Error::InvalidTemplate { .. }),
                "{bad:?}: {err}"
            );
        }
        let err = p.dns_names(&f, &["$HOSTNAME.x".into()]).unwrap_err();
        assert!(err.to_string().contains("$TRUST_DOMAIN"), "{err}");
    }

    #[test]
    fn spiffe_id_templates() {
        let p = ServicePolicy::new("cluster.local");
        let f = facts();
        let ok: &[(&str, Option<&str>)] = &[
            ("", None),
            (
                "spiffe://$TRUST_DOMAIN/ns/$POD_NAMESPACE/sa/$SERVICE_ACCOUNT_NAME",
                Some("spiffe://cluster.local/ns/team-a/sa/web"),
            ),
            (
                "spiffe://${TRUST_DOMAIN}/ns/${POD_NAMESPACE}/sa/${SERVICE_ACCOUNT_NAME}/${POD_NAME}",
                Some("spiffe://cluster.local/ns/team-a/sa/web/web-0"),
            ),
            (
                "spiffe://cluster.local/ns/team-a/sa/web/db",
                Some("spiffe://cluster.local/ns/team-a/sa/web/db"),
            ),
        ];
        for (template, expected) in ok {
            assert_eq!(
                p.spiffe_id(&f, template).unwrap().as_deref(),
                *expected,
                "{template:?}"
            );
        }
        let refused: &[(&str, tonic::Code)] = &[
            // Outside the pod's path or trust domain: not the pod's to ask.
            (
                "spiffe://$TRUST_DOMAIN/ns/$POD_NAMESPACE/sa/other",
                tonic::Code::PermissionDenied,
            ),
            (
                "spiffe://$TRUST_DOMAIN/ns/kube-system/sa/$SERVICE_ACCOUNT_NAME",
                tonic::Code::PermissionDenied,
            ),
            (
                "spiffe://$TRUST_DOMAIN/ns/$POD_NAMESPACE/sa/${SERVICE_ACCOUNT_NAME}x",
                tonic::Code::PermissionDenied,
            ),
            (
                "spiffe://evil.example/ns/$POD_NAMESPACE/sa/$SERVICE_ACCOUNT_NAME",
                tonic::Code::PermissionDenied,
            ),
            (
                "spiffe://$TRUST_DOMAIN/credlet/ca",
                tonic::Code::PermissionDenied,
            ),
            // Malformed.
            (
                "spiffe://$TRUST_DOMAIN/ns/$POD_NAMESPACE/sa/$NODE",
                tonic::Code::InvalidArgument,
            ),
            (
                "spiffe://$TRUST_DOMAIN/ns/$POD_NAMESPACE/sa/$SERVICE_ACCOUNT_NAME/../x",
                tonic::Code::InvalidArgument,
            ),
            (
                "spiffe://$TRUST_DOMAIN/ns/$POD_NAMESPACE/sa/$SERVICE_ACCOUNT_NAME?x",
                tonic::Code::InvalidArgument,
            ),
            ("https://example.com/", tonic::Code::InvalidArgument),
        ];
        for (template, code) in refused {
            let err = p.spiffe_id(&f, template).unwrap_err();
            assert_eq!(err.code(), *code, "{template:?}: {err}");
        }
        let err = p
            .spiffe_id(&f, "spiffe://$TRUST_DOMAIN/ns/kube-system/sa/admin")
            .unwrap_err();
        let message = err.to_string();
        for part in [
            "spiffe://cluster.local/ns/kube-system/sa/admin",
            "team-a/web-0",
            "spiffe://cluster.local/ns/team-a/sa/web or a path below it",
        ] {
            assert!(message.contains(part), "{message}");
        }
    }

    #[test]
    fn patterns_exact_and_suffix() {
        let mut p = ServicePolicy::new("cluster.local");
        p.add_dns_template("$POD_NAME.$POD_NAMESPACE.svc").unwrap();
        p.add_dns_template("*.$POD_NAMESPACE.example.com").unwrap();
        p.add_dns_template("team-b=*.b.example.com").unwrap();
        let f = facts();
        assert_eq!(
            p.dns_names(&f, &["$POD_NAME.$POD_NAMESPACE.svc".into()])
                .unwrap(),
            ["web-0.team-a.svc"]
        );
        assert!(p.dns_names(&f, &["api.team-a.example.com".into()]).is_ok());
        assert!(p.dns_names(&f, &["a.b.team-a.example.com".into()]).is_err());
        assert!(p.dns_names(&f, &["web-1.team-a.svc".into()]).is_err());
        assert!(p.dns_names(&f, &["api.team-b.example.com".into()]).is_err());
        let mut fb = facts();
        fb.namespace = "team-b".into();
        assert!(p.dns_names(&fb, &["x.b.example.com".into()]).is_ok());
        // The override replaces the node-wide list.
        assert!(
            p.dns_names(&fb, &["$POD_NAME.$POD_NAMESPACE.svc".into()])
                .is_err()
        );
        assert!(DnsPattern::parse("*.*.example.com").is_err());
        assert!(DnsPattern::parse("$NOPE.example.com").is_err());
    }

    #[test]
    fn ip_ranges() {
        let r = IpRange::parse("10.1.0.0/16").unwrap();
        assert!(r.contains("10.1.2.3".parse().unwrap()));
        assert!(!r.contains("10.2.0.1".parse().unwrap()));
        assert!(!r.contains("::1".parse().unwrap()));
        assert!(
            IpRange::parse("0.0.0.0/0")
                .unwrap()
                .contains("1.2.3.4".parse().unwrap())
        );
        assert!(IpRange::parse("10.0.0.0/33").is_err());
        let p = ServicePolicy::new("cluster.local");
        assert!(matches!(
            p.ip_addresses(&facts(), &["10.1.2.3".into()]),
            Err(Error::SanNotAllowed { .. })
        ));
    }

    /// The CA's own names are refused to every pod, before (and whatever)
    /// the allowed templates and ranges say; other names of the same
    /// ranges are still issued.
    #[test]
    fn the_cas_own_names_are_never_a_pods() {
        let mut p = ServicePolicy::new("cluster.local");
        p.add_dns_template("*.credlet.svc").unwrap();
        p.add_dns_template("$POD_NAME.credlet.svc").unwrap();
        p.ip_ranges.push(IpRange::parse("10.0.0.0/8").unwrap());
        p.ip_ranges.push(IpRange::parse("::/0").unwrap());
        p.ca_names = ServerNames::parse(&["credlet-ca.credlet.svc", "10.96.0.10", "fd00::10"]);
        let mut f = facts();
        f.pod_name = "credlet-ca".into();
        let dns: &[(&str, bool)] = &[
            ("credlet-ca.credlet.svc", false),
            ("CREDLET-CA.credlet.svc", false),
            ("$POD_NAME.credlet.svc", false),
            ("${POD_NAME}.credlet.svc", false),
            ("other.credlet.svc", true),
        ];
        for (template, issued) in dns {
            let result = p.dns_names(&f, &[(*template).to_owned()]);
            assert_eq!(result.is_ok(), *issued, "{template}: {result:?}");
            if let Err(error) = result {
                assert_eq!(error.reason(), "SanReservedForCa", "{template}");
                assert_eq!(error.code(), tonic::Code::PermissionDenied);
            }
        }
        let ips: &[(&str, bool)] = &[
            ("10.96.0.10", false),
            ("::ffff:10.96.0.10", false),
            ("fd00::10", false),
            ("fd00:0:0::10", false),
            ("10.96.0.11", true),
            ("fd00::11", true),
        ];
        for (text, issued) in ips {
            let result = p.ip_addresses(&f, &[(*text).to_owned()]);
            assert_eq!(result.is_ok(), *issued, "{text}: {result:?}");
            if let Err(error) = result {
                assert_eq!(error.reason(), "SanReservedForCa", "{text}");
                assert!(error.to_string().contains("CA's own"), "{error}");
            }
        }
    }

    #[test]
    fn durations_are_capped_not_refused() {
        let p = ServicePolicy::new("cluster.local");
        assert_eq!(p.duration(0), Duration::from_secs(86400));
        assert_eq!(p.duration(u64::MAX), p.max_duration);
        assert_eq!(p.duration(1), p.min_duration);
    }

    #[test]
    fn node_ids() {
        let p = ServicePolicy::new("cluster.local");
        let id = p.node_spiffe_id("node-a");
        assert_eq!(id, "spiffe://cluster.local/credlet/node/node-a");
        assert_eq!(p.node_of_spiffe_id(&id), Some("node-a"));
        assert_eq!(
            p.node_of_spiffe_id("spiffe://other/credlet/node/node-a"),
            None
        );
        assert_eq!(
            p.node_of_spiffe_id("spiffe://cluster.local/ns/a/sa/b"),
            None
        );
    }

    #[test]
    fn renewals_of_one_second_are_spread() {
        let nb = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let na = nb + Duration::from_secs(86400);
        let mut seconds = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let at = renew_at_unix_ms(nb, na, 0, 0, 40);
            let start = 1_800_000_000_000i64;
            assert!(at >= start + 86_400_000 / 2 && at <= start + 86_400_000 * 7 / 10);
            seconds.insert(at / 1000);
        }
        assert!(seconds.len() > 5_000, "{} distinct seconds", seconds.len());
        let at = renew_at_unix_ms(nb, na, 3600, 0, 40);
        let end = 1_800_086_400_000i64;
        assert!(at <= end - 3_600_000 && at >= end - 3_600_000 - 8_640_000);
    }

    #[test]
    fn renewal_spread_is_configurable_and_can_be_off() {
        let nb = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let na = nb + Duration::from_secs(86400);
        let start = 1_800_000_000_000i64;
        // Off: every certificate of the same second renews at the same
        // moment, 60 % into the lifetime.
        for _ in 0..100 {
            assert_eq!(
                renew_at_spread_unix_ms(nb, na, 0, 0, 40, 0),
                start + 86_400_000 * 6 / 10
            );
        }
        // ±20 %: 40–80 %.
        let mut seconds = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let at = renew_at_spread_unix_ms(nb, na, 0, 0, 40, 20);
            assert!(at >= start + 86_400_000 * 4 / 10 && at <= start + 86_400_000 * 8 / 10);
            seconds.insert(at / 1000);
        }
        assert!(seconds.len() > 8_000, "{} distinct seconds", seconds.len());
        let mut policy = ServicePolicy::new("cluster.local");
        policy.renewal_spread_percent = 41;
        assert!(policy.validate().is_err());
    }
}
