//! Name templates: the one grammar for every name a pod asks for.
//!
//! The agent checks volume attributes with it, the CA service expands the
//! templates it receives and its allowed DNS patterns with it, and the
//! PodCertificateRequest signer checks annotations with it. One grammar
//! means a template the agent accepts is one the CA understands.

use std::fmt;
use std::ops::Range;

use crate::error::TemplateError;
use crate::policy::PodIdentity;

/// A variable a template may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TemplateVariable {
    /// `$POD_NAME`: the pod's name.
    PodName,
    /// `$POD_NAMESPACE`: the pod's namespace.
    PodNamespace,
    /// `$POD_UID`: the pod's UID.
    PodUid,
    /// `$SERVICE_ACCOUNT_NAME`: the pod's service account.
    ServiceAccountName,
    /// `$TRUST_DOMAIN`: the issuing CA's SPIFFE trust domain.
    TrustDomain,
}

impl TemplateVariable {
    /// Every variable, in the order error messages list them.
    pub const ALL: [Self; 5] = [
        Self::PodName,
        Self::PodNamespace,
        Self::PodUid,
        Self::ServiceAccountName,
        Self::TrustDomain,
    ];

    /// The name without `$`: `POD_NAME`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::PodName => "POD_NAME",
            Self::PodNamespace => "POD_NAMESPACE",
            Self::PodUid => "POD_UID",
            Self::ServiceAccountName => "SERVICE_ACCOUNT_NAME",
            Self::TrustDomain => "TRUST_DOMAIN",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.name() == name)
    }
}

/// `$POD_NAME`.
impl fmt::Display for TemplateVariable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "${}", self.name())
    }
}

/// The values variables expand to. Whoever builds it vouches for them: the
/// CA fills them from the verified token only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TemplateVars<'a> {
    /// `$POD_NAME`.
    pub pod_name: &'a str,
    /// `$POD_NAMESPACE`.
    pub pod_namespace: &'a str,
    /// `$POD_UID`.
    pub pod_uid: &'a str,
    /// `$SERVICE_ACCOUNT_NAME`.
    pub service_account_name: &'a str,
    /// `$TRUST_DOMAIN`.
    pub trust_domain: &'a str,
}

impl<'a> TemplateVars<'a> {
    /// The values for `pod` in `trust_domain`.
    pub fn new(pod: &'a PodIdentity, trust_domain: &'a str) -> Self {
        Self {
            pod_name: &pod.name,
            pod_namespace: &pod.namespace,
            pod_uid: &pod.uid,
            service_account_name: &pod.service_account,
            trust_domain,
        }
    }

    /// The value of one variable.
    pub fn get(&self, variable: TemplateVariable) -> &'a str {
        match variable {
            TemplateVariable::PodName => self.pod_name,
            TemplateVariable::PodNamespace => self.pod_namespace,
            TemplateVariable::PodUid => self.pod_uid,
            TemplateVariable::ServiceAccountName => self.service_account_name,
            TemplateVariable::TrustDomain => self.trust_domain,
        }
    }
}

/// A parsed name template.
///
/// Grammar: literal text and variables, each written `$NAME` or `${NAME}`:
/// `$POD_NAME`, `$POD_NAMESPACE`, `$POD_UID`, `$SERVICE_ACCOUNT_NAME` and
/// `$TRUST_DOMAIN`. A bare `$NAME` takes the longest run of `A`–`Z` and `_`
/// after the `$`, so `$POD_NAMESPACE` is never `$POD_NAME` followed by
/// `SPACE`, and a variable followed by an uppercase letter or `_` must be
/// braced (`${POD_NAME}_A`). Any other `$` is an error, and so is a control
/// character anywhere: there is no escape for a literal `$`, since no name
/// credlet issues may contain one.
///
/// A template keeps its text as written (for messages, and to be sent on
/// unexpanded) and expands without failing: every error is found by
/// [`Template::parse`].
///
/// ```
/// use credlet_ca::{Template, TemplateVars};
///
/// let template = Template::parse("${POD_NAME}.$POD_NAMESPACE.svc")?;
/// let vars = TemplateVars {
///     pod_name: "web-0",
///     pod_namespace: "shop",
///     pod_uid: "0b7d3c36-7ad9-4cf1-9f0c-3d5a7c1f2e10",
///     service_account_name: "web",
///     trust_domain: "cluster.local",
/// };
/// assert_eq!(template.expand(&vars), "web-0.shop.svc");
/// assert!(Template::parse("$HOSTNAME.svc").is_err());
/// # Ok::<(), credlet_ca::TemplateError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    source: String,
    pieces: Vec<Piece>,
}

/// Pieces point into the source; a variable's range covers its `$` token.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Literal(Range<usize>),
    Variable(TemplateVariable, Range<usize>),
}

impl Template {
    /// Parses a template (the grammar is in the [type documentation](Template)).
    pub fn parse(source: &str) -> Result<Self, TemplateError> {
        if source.chars().any(char::is_control) {
            return Err(TemplateError::ControlCharacter);
        }
        let mut pieces = Vec::new();
        let mut literal_start = 0;
        let mut at = 0;
        while let Some(found) = source[at..].find('$') {
            let dollar = at + found;
            let after = dollar + 1;
            let (name, end) = if source[after..].starts_with('{') {
                let name_start = after + 1;
                let close = source[name_start..]
                    .find('}')
                    .ok_or(TemplateError::UnterminatedBrace { offset: dollar })?;
                (
                    &source[name_start..name_start + close],
                    name_start + close + 1,
                )
            } else {
                let len = source[after..]
                    .find(|c: char| !(c.is_ascii_uppercase() || c == '_'))
                    .unwrap_or(source.len() - after);
                (&source[after..after + len], after + len)
            };
            if name.is_empty() {
                return Err(TemplateError::MissingVariableName { offset: dollar });
            }
            let variable = TemplateVariable::from_name(name).ok_or_else(|| {
                TemplateError::UnknownVariable {
                    variable: shorten(&source[dollar..end]),
                }
            })?;
            if literal_start < dollar {
                pieces.push(Piece::Literal(literal_start..dollar));
            }
            pieces.push(Piece::Variable(variable, dollar..end));
            literal_start = end;
            at = end;
        }
        if literal_start < source.len() {
            pieces.push(Piece::Literal(literal_start..source.len()));
        }
        Ok(Self {
            source: source.to_owned(),
            pieces,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The template with every variable replaced by its value.
    pub fn expand(&self, vars: &TemplateVars<'_>) -> String {
        let mut out = String::with_capacity(self.source.len() + 32);
        for piece in &self.pieces {
            match piece {
                Piece::Literal(range) => out.push_str(&self.source[range.clone()]),
                Piece::Variable(variable, _) => out.push_str(vars.get(*variable)),
            }
        }
        out
    }

    /// The same template with its literal text in ASCII lowercase and its
    /// variables as written: DNS names compare case-insensitively, but
    /// variable names are uppercase. The result parses to the same
    /// variables, since a bare variable is never followed by an uppercase
    /// letter.
    pub fn lowercase_literals(&self) -> Self {
        let mut lowered = self.clone();
        for piece in &self.pieces {
            if let Piece::Literal(range) = piece {
                lowered.source[range.clone()].make_ascii_lowercase();
            }
        }
        lowered
    }
}

/// The template as written.
impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Parses `template` and expands it: for callers that keep templates as
/// text.
pub fn expand_template(template: &str, vars: &TemplateVars<'_>) -> Result<String, TemplateError> {
    Template::parse(template).map(|t| t.expand(vars))
}

/// An unknown variable as written, cut to a length fit for a message.
fn shorten(token: &str) -> String {
    const MAX_CHARS: usize = 64;
    if token.chars().count() <= MAX_CHARS {
        token.to_owned()
    } else {
        let mut short: String = token.chars().take(MAX_CHARS - 1).collect();
        short.push('…');
        short
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VARS: TemplateVars<'static> = TemplateVars {
        pod_name: "web-0",
        pod_namespace: "shop",
        pod_uid: "0b7d3c36-7ad9-4cf1-9f0c-3d5a7c1f2e10",
        service_account_name: "web-sa",
        trust_domain: "cluster.local",
    };

    #[test]
    fn expansions() {
        let cases: &[(&str, &str)] = &[
            ("", ""),
            ("plain.example", "plain.example"),
            ("braces { and } alone", "braces { and } alone"),
            ("$POD_NAME", "web-0"),
            ("${POD_NAME}", "web-0"),
            ("$POD_NAMESPACE", "shop"),
            ("${POD_NAMESPACE}", "shop"),
            ("$POD_UID", "0b7d3c36-7ad9-4cf1-9f0c-3d5a7c1f2e10"),
            ("${POD_UID}", "0b7d3c36-7ad9-4cf1-9f0c-3d5a7c1f2e10"),
            ("$SERVICE_ACCOUNT_NAME", "web-sa"),
            ("${SERVICE_ACCOUNT_NAME}", "web-sa"),
            ("$TRUST_DOMAIN", "cluster.local"),
            ("${TRUST_DOMAIN}", "cluster.local"),
            ("$POD_NAME.$POD_NAMESPACE.svc", "web-0.shop.svc"),
            ("${POD_NAME}.${POD_NAMESPACE}.svc", "web-0.shop.svc"),
            ("${POD_NAME}.$POD_NAMESPACE.svc", "web-0.shop.svc"),
            // Adjacent variables.
            (
                "$POD_NAME$POD_UID",
                "web-00b7d3c36-7ad9-4cf1-9f0c-3d5a7c1f2e10",
            ),
            (
                "${POD_NAME}${POD_UID}",
                "web-00b7d3c36-7ad9-4cf1-9f0c-3d5a7c1f2e10",
            ),
            ("$POD_NAMESPACE$POD_NAME", "shopweb-0"),
            // $POD_NAMESPACE is not $POD_NAME + "SPACE"; braces say so.
            ("$POD_NAMESPACE.$POD_NAME", "shop.web-0"),
            ("${POD_NAME}SPACE", "web-0SPACE"),
            ("${POD_NAME}_x", "web-0_x"),
            // A bare name ends at the first character outside A-Z and _.
            ("$POD_NAME-1", "web-0-1"),
            ("$POD_NAME0", "web-00"),
            ("$POD_NAMEx", "web-0x"),
            (
                "spiffe://$TRUST_DOMAIN/ns/$POD_NAMESPACE/sa/$SERVICE_ACCOUNT_NAME/db",
                "spiffe://cluster.local/ns/shop/sa/web-sa/db",
            ),
            ("{$POD_NAME}", "{web-0}"),
        ];
        for (template, expected) in cases {
            let parsed = Template::parse(template).unwrap_or_else(|e| panic!("{template:?}: {e}"));
            assert_eq!(parsed.expand(&VARS), *expected, "{template:?}");
            assert_eq!(parsed.as_str(), *template);
            assert_eq!(parsed.to_string(), *template);
            assert_eq!(expand_template(template, &VARS).as_deref(), Ok(*expected));
        }
    }

    #[test]
    fn rejections() {
        use TemplateError::*;
        let unknown = |v: &str| UnknownVariable {
            variable: v.to_owned(),
        };
        let cases: Vec<(&str, TemplateError)> = vec![
            ("$HOSTNAME.example", unknown("$HOSTNAME")),
            ("${HOSTNAME}.example", unknown("${HOSTNAME}")),
            ("${pod_name}", unknown("${pod_name}")),
            ("${ POD_NAME }", unknown("${ POD_NAME }")),
            ("$POD_NAME_", unknown("$POD_NAME_")),
            ("$POD_NAMES", unknown("$POD_NAMES")),
            ("$POD_NAMESPACEX", unknown("$POD_NAMESPACEX")),
            ("$POD_NAME$NODE", unknown("$NODE")),
            ("${POD_NAME", UnterminatedBrace { offset: 0 }),
            ("a.${POD_NAME.svc", UnterminatedBrace { offset: 2 }),
            ("${", UnterminatedBrace { offset: 0 }),
            ("${}", MissingVariableName { offset: 0 }),
            ("x.${}.y", MissingVariableName { offset: 2 }),
            ("web$", MissingVariableName { offset: 3 }),
            ("$", MissingVariableName { offset: 0 }),
            ("$$POD_NAME", MissingVariableName { offset: 0 }),
            ("$.svc", MissingVariableName { offset: 0 }),
            ("$pod_name", MissingVariableName { offset: 0 }),
            ("a\nb", ControlCharacter),
            ("$POD_NAME\t", ControlCharacter),
            ("${POD\u{7f}NAME}", ControlCharacter),
            ("\u{85}", ControlCharacter),
        ];
        for (template, expected) in cases {
            assert_eq!(Template::parse(template), Err(expected), "{template:?}");
        }
    }

    #[test]
    fn messages_name_the_known_variables() {
        for template in ["$HOSTNAME", "${}", "a$"] {
            let message = Template::parse(template).unwrap_err().to_string();
            for variable in TemplateVariable::ALL {
                assert!(
                    message.contains(&variable.to_string()),
                    "{template:?}: {message}"
                );
            }
        }
        let message = Template::parse("${POD_NAME").unwrap_err().to_string();
        assert!(message.contains("no closing"), "{message}");
        let long = format!("${{{}}}", "X".repeat(500));
        let message = Template::parse(&long).unwrap_err().to_string();
        assert!(message.len() < 300, "{message}");
    }

    #[test]
    fn vars_from_a_pod_identity() {
        let pod = PodIdentity {
            namespace: "shop".into(),
            name: "web-0".into(),
            uid: "0b7d3c36-7ad9-4cf1-9f0c-3d5a7c1f2e10".into(),
            service_account: "web-sa".into(),
        };
        assert_eq!(TemplateVars::new(&pod, "cluster.local"), VARS);
        for variable in TemplateVariable::ALL {
            let braced = Template::parse(&format!("${{{}}}", variable.name())).unwrap();
            let bare = Template::parse(&variable.to_string()).unwrap();
            assert_eq!(braced.expand(&VARS), VARS.get(variable));
            assert_eq!(bare.expand(&VARS), VARS.get(variable));
        }
    }

    #[test]
    fn lowercase_literals_keeps_variables() {
        let cases = [
            ("WEB.$POD_NAME.Svc", "web.$POD_NAME.svc"),
            ("${POD_NAME}_X.EXAMPLE", "${POD_NAME}_x.example"),
            ("$POD_NAME$POD_UID", "$POD_NAME$POD_UID"),
            ("API.${TRUST_DOMAIN}", "api.${TRUST_DOMAIN}"),
        ];
        for (template, expected) in cases {
            let lowered = Template::parse(template).unwrap().lowercase_literals();
            assert_eq!(lowered.as_str(), expected);
            assert_eq!(Template::parse(expected), Ok(lowered.clone()));
            assert_eq!(
                lowered.expand(&VARS),
                Template::parse(template)
                    .unwrap()
                    .expand(&VARS)
                    .to_ascii_lowercase()
            );
        }
    }
}
