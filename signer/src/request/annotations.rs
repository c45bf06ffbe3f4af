//! `spec.unverifiedUserAnnotations`: the keys credlet reads, parsed into
//! [`RequestedOptions`].

use std::collections::BTreeMap;
use std::net::IpAddr;

use credlet_ca::{Template, TemplateVars};

use super::{
    DNS_NAMES_ANNOTATION, Denial, DenialReason, KNOWN_ANNOTATIONS, MAX_ANNOTATIONS_LEN,
    MAX_DNS_NAMES, MAX_DNS_TEMPLATE_LEN, RequestedOptions,
};

fn invalid(message: String) -> Denial {
    Denial::new(DenialReason::InvalidUnverifiedUserAnnotations, message)
}

/// Parses the annotations; any key credlet does not read is a denial.
pub(super) fn parse(
    annotations: Option<&BTreeMap<String, String>>,
) -> Result<RequestedOptions, Denial> {
    let mut options = RequestedOptions::default();
    let Some(annotations) = annotations else {
        return Ok(options);
    };
    let total: usize = annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_ANNOTATIONS_LEN {
        return Err(invalid(format!(
            "spec.unverifiedUserAnnotations hold {total} bytes, more than credlet's limit of {MAX_ANNOTATIONS_LEN}"
        )));
    }
    for (key, value) in annotations {
        match key.as_str() {
            DNS_NAMES_ANNOTATION => options.dns_names = dns_templates(value)?,
            _ => {
                return Err(invalid(format!(
                    "unverifiedUserAnnotations key {:?} is not one this signer reads; remove it from the pod's podCertificate userAnnotations (accepted keys: {})",
                    printable(key),
                    KNOWN_ANNOTATIONS.join(", ")
                )));
            }
        }
    }
    Ok(options)
}

/// Splits `credlet.io/dns-names` and checks each template's syntax: a DNS
/// name once its variables are expanded, no wildcard, no IP address.
fn dns_templates(value: &str) -> Result<Vec<String>, Denial> {
    let key = DNS_NAMES_ANNOTATION;
    let mut templates: Vec<String> = Vec::new();
    for raw in value.split(',') {
        let template = raw.trim();
        if template.is_empty() {
            return Err(invalid(format!(
                "{key} has an empty entry in {:?}; give comma-separated DNS names",
                printable(value)
            )));
        }
        if template.len() > MAX_DNS_TEMPLATE_LEN {
            return Err(invalid(format!(
                "{key} entry of {} bytes is longer than {MAX_DNS_TEMPLATE_LEN}",
                template.len()
            )));
        }
        let template = check_template(template).map_err(|reason| {
            invalid(format!(
                "{key} entry {:?} is not a DNS name template: {reason}",
                printable(template)
            ))
        })?;
        // Names compare case-insensitively, so WEB.x and web.x are one name.
        let template = template.lowercase_literals().to_string();
        if !templates.contains(&template) {
            templates.push(template);
        }
        if templates.len() > MAX_DNS_NAMES {
            return Err(invalid(format!(
                "{key} names more than {MAX_DNS_NAMES} DNS names"
            )));
        }
    }
    Ok(templates)
}

fn check_template(template: &str) -> Result<Template, String> {
    if template.contains('*') {
        return Err("wildcards are not issued".to_owned());
    }
    if template.parse::<IpAddr>().is_ok() {
        return Err(
            "it is an IP address; IP SANs are not issued to pod certificate requests".to_owned(),
        );
    }
    // The CA's own grammar; expanding with short stand-ins leaves a name
    // whose syntax is the template's.
    let parsed = Template::parse(template).map_err(|e| e.to_string())?;
    let name = parsed.expand(&TemplateVars {
        pod_name: "pod",
        pod_namespace: "ns",
        pod_uid: "uid",
        service_account_name: "sa",
        trust_domain: "td",
    });
    let label_ok = |label: &str| {
        let b = label.as_bytes();
        !b.is_empty()
            && b.len() <= 63
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-'
    };
    if !name.split('.').all(label_ok) {
        return Err(
            "every label must be 1 to 63 letters, digits or hyphens, not starting or ending with a hyphen"
                .to_owned(),
        );
    }
    Ok(parsed)
}

/// At most 64 characters of `s`, control characters escaped by `{:?}`.
fn printable(s: &str) -> String {
    if s.chars().count() <= 64 {
        s.to_owned()
    } else {
        let mut short: String = s.chars().take(61).collect();
        short.push('…');
        short
    }
}
