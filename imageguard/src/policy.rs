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

    /// Whether a pod of `namespace` must prove access to `image`, given
    /// what credlet knows of the image's provenance (`None`: never saw it
    /// pulled — preloaded, or pulled before credlet ran).
    pub fn requires_verification(
        &self,
        namespace: &str,
        image: &ImageRef,
        provenance: Option<Provenance>,
    ) -> bool {
        if provenance == Some(Provenance::Anonymous) {
            return false;
        }
        match self.for_namespace(namespace) {
            VerifyPolicy::NeverVerify => false,
            VerifyPolicy::NeverVerifyPreloadedImages => provenance.is_some(),
            VerifyPolicy::NeverVerifyAllowlistedImages => !self.allowlist.matches(image),
            VerifyPolicy::AlwaysVerify => true,
        }
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
        let mut policy = GuardPolicy {
            allowlist: Allowlist::parse(["registry.example/base/*"]).expect("allowlist"),
            ..GuardPolicy::default()
        };
        let private = image("registry.example/team/app:v1");
        let base = image("registry.example/base/distroless:1");
        let creds = Some(Provenance::Credentials);
        let public = Some(Provenance::Anonymous);

        // Default: NeverVerifyPreloadedImages.
        assert!(policy.requires_verification("a", &private, creds));
        assert!(!policy.requires_verification("a", &private, None));
        assert!(!policy.requires_verification("a", &private, public));

        policy.default = VerifyPolicy::AlwaysVerify;
        assert!(policy.requires_verification("a", &private, None));
        assert!(!policy.requires_verification("a", &private, public));

        policy.default = VerifyPolicy::NeverVerifyAllowlistedImages;
        assert!(policy.requires_verification("a", &private, None));
        assert!(!policy.requires_verification("a", &base, creds));

        policy
            .namespaces
            .insert("trusted".into(), VerifyPolicy::NeverVerify);
        assert!(!policy.requires_verification("trusted", &private, creds));
        assert!(policy.requires_verification("other", &private, creds));
    }
}
