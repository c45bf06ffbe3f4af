//! Verification policies (KEP-2535's names), node-wide with per-namespace
//! overrides, and the audit mode.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::reference::{Allowlist, ImageRef};

/// When a cached image must be verified for a pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum VerifyPolicy {
    /// Never: any pod may use any cached image.
    NeverVerify,
    /// Verify images credlet saw pulled with credentials; images already on
    /// the node before credlet saw them (preloaded) are not verified.
    #[default]
    NeverVerifyPreloadedImages,
    /// Verify every image except those on the allowlist.
    NeverVerifyAllowlistedImages,
    /// Verify every image not known to be public.
    AlwaysVerify,
}

impl VerifyPolicy {
    /// The KEP-2535 name.
    pub fn name(self) -> &'static str {
        match self {
            Self::NeverVerify => "NeverVerify",
            Self::NeverVerifyPreloadedImages => "NeverVerifyPreloadedImages",
            Self::NeverVerifyAllowlistedImages => "NeverVerifyAllowlistedImages",
            Self::AlwaysVerify => "AlwaysVerify",
        }
    }
}

impl fmt::Display for VerifyPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A policy name that is not one of the four.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "unknown verification policy {0:?}; use NeverVerify, NeverVerifyPreloadedImages, NeverVerifyAllowlistedImages or AlwaysVerify"
)]
pub struct UnknownPolicy(pub String);

impl FromStr for VerifyPolicy {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            Self::NeverVerify,
            Self::NeverVerifyPreloadedImages,
            Self::NeverVerifyAllowlistedImages,
            Self::AlwaysVerify,
        ]
        .into_iter()
        .find(|p| p.name().eq_ignore_ascii_case(s.trim()))
        .ok_or_else(|| UnknownPolicy(s.to_owned()))
    }
}

/// Enforce decisions, or only log and count them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Deny what the policy denies.
    #[default]
    Enforce,
    /// Decide, log and count exactly as enforcement would, never block.
    Audit,
}

/// How an image came to be on the node, as far as credlet knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Provenance {
    /// Pulled through credlet with credentials: private until shown
    /// otherwise.
    Credentials,
    /// Pulled through credlet without credentials, or an anonymous check
    /// succeeded: public.
    Anonymous,
}

/// The guard's whole policy.
#[derive(Clone, Debug)]
pub struct GuardPolicy {
    /// Node-wide policy.
    pub default: VerifyPolicy,
    /// Per-namespace overrides.
    pub namespaces: HashMap<String, VerifyPolicy>,
    /// Images never verified under `NeverVerifyAllowlistedImages`.
    pub allowlist: Allowlist,
    /// Enforce or audit.
    pub mode: Mode,
    /// How long a positive verification holds.
    pub ttl: Duration,
}

impl Default for GuardPolicy {
    fn default() -> Self {
        Self {
            default: VerifyPolicy::default(),
            namespaces: HashMap::new(),
            allowlist: Allowlist::default(),
            mode: Mode::Enforce,
            ttl: Duration::from_secs(24 * 3600),
        }
    }
}

impl GuardPolicy {
    /// The policy for pods of `namespace`.
    pub fn for_namespace(&self, namespace: &str) -> VerifyPolicy {
        self.namespaces
            .get(namespace)
            .copied()
            .unwrap_or(self.default)
    }

    /// Whether a pod of `namespace` must prove access to an image known to
    /// the runtime by `names` (its repo tags and digests, normalized), given
    /// what credlet knows of the image's provenance (`None`: never saw it
    /// pulled — preloaded, or pulled before credlet ran).
    ///
    /// The allowlist applies to the image's own names, never to the string
    /// a caller asked for (a short image id parses as a tag of
    /// `docker.io/library/sha256`): the image is allowlisted only if it has
    /// names and every one of them is allowlisted, so a private name the
    /// image also carries keeps it protected.
    pub fn requires_verification(
        &self,
        namespace: &str,
        names: &[ImageRef],
        provenance: Option<Provenance>,
    ) -> bool {
        if provenance == Some(Provenance::Anonymous) {
            return false;
        }
        match self.for_namespace(namespace) {
            VerifyPolicy::NeverVerify => false,
            VerifyPolicy::NeverVerifyPreloadedImages => provenance.is_some(),
            VerifyPolicy::NeverVerifyAllowlistedImages => !self.allowlisted(names),
            VerifyPolicy::AlwaysVerify => true,
        }
    }

    /// Whether an image known by `names` is on the allowlist: it has names
    /// and all of them are.
    pub fn allowlisted(&self, names: &[ImageRef]) -> bool {
        !names.is_empty() && names.iter().all(|n| self.allowlist.matches(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(s: &str) -> ImageRef {
        ImageRef::parse(s).expect("reference")
    }

    #[test]
    fn names_round_trip() {
        for p in [
            VerifyPolicy::NeverVerify,
            VerifyPolicy::NeverVerifyPreloadedImages,
            VerifyPolicy::NeverVerifyAllowlistedImages,
            VerifyPolicy::AlwaysVerify,
        ] {
            assert_eq!(p.name().parse::<VerifyPolicy>(), Ok(p));
        }
        assert!("Sometimes".parse::<VerifyPolicy>().is_err());
    }

    #[test]
    fn decision_table() {
        let allowlist = Allowlist::parse(["registry.example/base/*"]).expect("allowlist");
        let private = [image("registry.example/team/app:v1")];
        let base = [image("registry.example/base/distroless:1")];
        // The same image under an allowlisted and a private name.
        let both = [base[0].clone(), private[0].clone()];
        let creds = Some(Provenance::Credentials);
        let public = Some(Provenance::Anonymous);
        use VerifyPolicy::*;
        // (node policy, "trusted" override, namespace, names, provenance, verify?)
        type Row<'a> = (
            VerifyPolicy,
            Option<VerifyPolicy>,
            &'a str,
            &'a [ImageRef],
            Option<Provenance>,
            bool,
        );
        let table: &[Row<'_>] = &[
            (NeverVerifyPreloadedImages, None, "a", &private, creds, true),
            (NeverVerifyPreloadedImages, None, "a", &private, None, false),
            (
                NeverVerifyPreloadedImages,
                None,
                "a",
                &private,
                public,
                false,
            ),
            (AlwaysVerify, None, "a", &private, None, true),
            (AlwaysVerify, None, "a", &private, public, false),
            (AlwaysVerify, None, "a", &[], None, true),
            (
                NeverVerifyAllowlistedImages,
                None,
                "a",
                &private,
                None,
                true,
            ),
            (NeverVerifyAllowlistedImages, None, "a", &base, creds, false),
            (NeverVerifyAllowlistedImages, None, "a", &both, None, true),
            // No names (a bare image id with no tags): not allowlisted.
            (NeverVerifyAllowlistedImages, None, "a", &[], None, true),
            (
                NeverVerifyAllowlistedImages,
                None,
                "a",
                &base,
                public,
                false,
            ),
            (
                NeverVerifyAllowlistedImages,
                Some(NeverVerify),
                "trusted",
                &private,
                creds,
                false,
            ),
            (
                NeverVerifyAllowlistedImages,
                Some(NeverVerify),
                "other",
                &private,
                creds,
                true,
            ),
            (
                NeverVerify,
                Some(AlwaysVerify),
                "trusted",
                &base,
                None,
                true,
            ),
        ];
        for (i, (default, trusted, namespace, names, provenance, want)) in table.iter().enumerate()
        {
            let policy = GuardPolicy {
                default: *default,
                namespaces: trusted.iter().map(|p| ("trusted".to_owned(), *p)).collect(),
                allowlist: allowlist.clone(),
                ..GuardPolicy::default()
            };
            assert_eq!(
                policy.requires_verification(namespace, names, *provenance),
                *want,
                "row {i}: {default} ns {namespace} {names:?} {provenance:?}"
            );
        }
    }
}
