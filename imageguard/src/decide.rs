//! The guard's decisions as pure functions over plain data: what the
//! runtime, the records, the pod index and the registry said goes in, a
//! decision comes out. [`crate::guard`] gathers those facts (all the I/O)
//! and acts on the answer; here everything is a table test away.

use std::collections::{BTreeSet, HashMap};

use credlet_proto::cri::{Image, VersionResponse};

use crate::policy::{GuardPolicy, Provenance};
use crate::reference::ImageRef;
use crate::registry::Access;

// --- whose call it is --------------------------------------------------------

/// What the pod index says about the uid a sandbox was run for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listing<'a> {
    /// The pod list is not loaded yet (the API server has not answered
    /// since the guard started).
    NotLoaded,
    /// No pod on this node has that uid.
    Missing,
    /// The pod with that uid (a static pod's: its mirror pod).
    Listed {
        /// Its namespace.
        namespace: &'a str,
        /// Its name.
        name: &'a str,
    },
}

/// Whether the pod a sandbox claims to be can be relied on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// uid, namespace and name are those of one pod the API server placed
    /// on this node.
    Confirmed,
    /// A static pod (its uid is the hash of its manifest) that the pod list
    /// does not show: taken as the runtime reports it, so that a node whose
    /// API server is itself a static pod can start it.
    Static,
    /// Not confirmed.
    Unconfirmed(Unconfirmed),
}

/// Why a sandbox's pod is not confirmed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unconfirmed {
    /// The pod list is not loaded yet.
    #[error("the node's pod list is not loaded yet (the API server has not answered)")]
    NotLoaded,
    /// No pod on this node has the uid.
    #[error("no pod on this node has uid {uid:?}")]
    Missing {
        /// The uid claimed.
        uid: String,
    },
    /// The uid is another pod's.
    #[error("the API server has uid {uid:?} as pod {listed}")]
    Mismatch {
        /// The uid claimed.
        uid: String,
        /// `namespace/name` of the pod that has it.
        listed: String,
    },
}

/// Whether a sandbox that claims pod `namespace/name` with `uid` is that
/// pod. A CRI caller can run a sandbox with any metadata: only the API
/// server's word counts, on all three.
pub fn identity(namespace: &str, name: &str, uid: &str, listing: Listing<'_>) -> Identity {
    match listing {
        Listing::Listed {
            namespace: ns,
            name: n,
        } if ns == namespace && n == name => Identity::Confirmed,
        Listing::Listed {
            namespace: ns,
            name: n,
        } => Identity::Unconfirmed(Unconfirmed::Mismatch {
            uid: uid.to_owned(),
            listed: format!("{ns}/{n}"),
        }),
        Listing::Missing | Listing::NotLoaded if is_static_pod_uid(uid) => Identity::Static,
        Listing::Missing => Identity::Unconfirmed(Unconfirmed::Missing {
            uid: uid.to_owned(),
        }),
        Listing::NotLoaded => Identity::Unconfirmed(Unconfirmed::NotLoaded),
    }
}

/// Whether `uid` has the form the kubelet gives a static pod: the hex MD5
/// of its manifest. API uids are UUIDs, with dashes.
pub fn is_static_pod_uid(uid: &str) -> bool {
    uid.len() == 32 && uid.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

// --- may this pod use this image ---------------------------------------------

/// The pod a decision is about.
#[derive(Clone, Copy, Debug)]
pub struct Pod<'a> {
    /// Its namespace (for the policy override).
    pub namespace: &'a str,
    /// Whether it is the pod it claims to be.
    pub identity: &'a Identity,
}

/// The answer for one image one pod uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No verification is required.
    NotRequired,
    /// Required, and the pod's own verification holds.
    Verified,
    /// Refused.
    Refused(Refusal),
}

/// Why a pod may not use a cached image.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A verification is required and the pod holds none.
    #[error("holds no verification of its pull credentials")]
    NoVerification,
    /// The pod holds a verification, but is not known to be that pod.
    #[error("holds a verification only if it is the pod it claims to be, and {0}")]
    Unconfirmed(Unconfirmed),
}

/// Decides whether a pod may use an image known to the runtime by `names`,
/// of `provenance` (`None`: never seen pulled), when it holds a valid
/// verification of it (`verified`) or not. `pod` is `None` for a call that
/// names no pod.
///
/// A pod whose identity is not confirmed is held to its namespace's policy
/// *and* the node's (a sandbox can claim any namespace), and its
/// verifications count for nothing: they are keyed by a uid it may have
/// borrowed.
pub fn judge(
    policy: &GuardPolicy,
    pod: Option<Pod<'_>>,
    names: &[ImageRef],
    provenance: Option<Provenance>,
    verified: bool,
) -> Decision {
    let requires = |namespace: &str| policy.requires_verification(namespace, names, provenance);
    // "" has no override: the node-wide policy.
    let node_wide = "";
    let required = match pod {
        None => requires(node_wide),
        Some(pod) => match pod.identity {
            Identity::Confirmed | Identity::Static => requires(pod.namespace),
            Identity::Unconfirmed(_) => requires(pod.namespace) || requires(node_wide),
        },
    };
    if !required {
        return Decision::NotRequired;
    }
    match pod.map(|p| p.identity) {
        Some(Identity::Confirmed | Identity::Static) if verified => Decision::Verified,
        Some(Identity::Unconfirmed(why)) if verified => {
            Decision::Refused(Refusal::Unconfirmed(why.clone()))
        }
        _ => Decision::Refused(Refusal::NoVerification),
    }
}

// --- what a pull proves ------------------------------------------------------

/// Whether a runtime pull of `pulled` brought the image it produced (now
/// known by `names`) to the node: credlet had no record of that image, and
/// it carries no name of another repository. containerd keeps content by
/// digest, so a pull of any name whose manifest is an image already on the
/// node yields that image without downloading it: such a pull proves
/// nothing about the image.
pub fn pull_brought_image(pulled: &ImageRef, names: &[ImageRef], recorded: bool) -> bool {
    !recorded && names.iter().all(|n| n.name() == pulled.name())
}

/// The repositories to check an image against: the ones credlet recorded
/// for it, or for an image it never recorded (or whose record lost them),
/// those of its own names. Never a name a caller brings.
pub fn trusted_repositories(
    recorded: Option<&BTreeSet<String>>,
    names: &[ImageRef],
) -> BTreeSet<String> {
    match recorded {
        Some(repositories) if !repositories.is_empty() => repositories.clone(),
        _ => names.iter().map(ImageRef::name).collect(),
    }
}

/// Where to ask a registry about `image`: each trusted repository with the
/// manifest digest the image has there (the `requested` repository first,
/// if trusted). A trusted repository the image has no digest for is asked
/// for a digest it has in another trusted one; without any, there is
/// nothing to ask.
pub fn check_targets(
    trusted: &BTreeSet<String>,
    image: &Image,
    requested: Option<&ImageRef>,
) -> Vec<(ImageRef, String)> {
    let digests: Vec<(String, String)> = image
        .repo_digests
        .iter()
        .filter_map(|d| {
            let parsed = ImageRef::parse(d).ok()?;
            Some((parsed.name(), parsed.digest()?.to_owned()))
        })
        .filter(|(name, _)| trusted.contains(name))
        .chain(
            requested
                .filter(|r| trusted.contains(&r.name()))
                .and_then(|r| Some((r.name(), r.digest()?.to_owned()))),
        )
        .collect();
    let Some((_, fallback)) = digests.first() else {
        return Vec::new();
    };
    let first = requested
        .map(ImageRef::name)
        .filter(|r| trusted.contains(r));
    first
        .iter()
        .chain(trusted.iter().filter(|r| Some(*r) != first.as_ref()))
        .filter_map(|repository| {
            let digest = digests
                .iter()
                .find(|(name, _)| name == repository)
                .map_or(fallback, |(_, d)| d);
            Some((ImageRef::parse(repository).ok()?, digest.clone()))
        })
        .collect()
}

/// One registry check's outcome, as plain data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Checked {
    /// The registry answered; see [`Access`].
    Answered(Access),
    /// It could not be asked (unreachable, timeout, malformed answer).
    Failed(String),
}

/// What checks of a pod's credential against the trusted repositories
/// prove.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialCheck {
    /// One of them granted access.
    Granted,
    /// None has the manifest any more (404 each): the runtime may resolve
    /// the tag again.
    NotFound(String),
    /// Refused.
    Denied(String),
    /// Not every repository could be asked, and none granted.
    Unknown(String),
}

/// Combines credential checks: any grant is enough; a denial is final only
/// when every repository answered.
pub fn credential_check(results: &[Checked]) -> CredentialCheck {
    let mut denied = None;
    let mut not_found = None;
    let mut failed = None;
    for result in results {
        match result {
            Checked::Answered(Access::Granted) => return CredentialCheck::Granted,
            Checked::Answered(Access::Denied { reason }) => {
                denied.get_or_insert_with(|| reason.clone());
            }
            Checked::Answered(Access::NotFound { reason }) => {
                not_found.get_or_insert_with(|| reason.clone());
            }
            Checked::Failed(error) => {
                failed.get_or_insert_with(|| error.clone());
            }
        }
    }
    match (failed, denied, not_found) {
        (Some(error), _, _) => CredentialCheck::Unknown(error),
        (None, Some(reason), _) => CredentialCheck::Denied(reason),
        (None, None, Some(reason)) => CredentialCheck::NotFound(reason),
        (None, None, None) => CredentialCheck::Unknown("nothing to ask".to_owned()),
    }
}

/// What anonymous checks of a public image's trusted repositories, asked
/// again when the public answer ran out, say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublicCheck {
    /// Still public: a repository serves the manifest anonymously, or lets
    /// an anonymous request in and no longer has it (a manifest deleted
    /// after its tag moved on; the repository is public).
    Public(String),
    /// Every repository refused an anonymous request: private from now on.
    Private(String),
    /// A repository could not be asked: the last answer stands.
    Unknown(String),
}

/// Combines anonymous re-checks of a public answer.
pub fn public_check(results: &[Checked]) -> PublicCheck {
    let mut denied = None;
    let mut failed = None;
    for result in results {
        match result {
            Checked::Answered(Access::Granted) => {
                return PublicCheck::Public("still public".to_owned());
            }
            Checked::Answered(Access::NotFound { reason }) => {
                return PublicCheck::Public(format!(
                    "the repository still answers anonymously, without this manifest: {reason}"
                ));
            }
            Checked::Answered(Access::Denied { reason }) => {
                denied.get_or_insert_with(|| reason.clone());
            }
            Checked::Failed(error) => {
                failed.get_or_insert_with(|| error.clone());
            }
        }
    }
    match (failed, denied) {
        (Some(error), _) => PublicCheck::Unknown(error),
        (None, Some(reason)) => PublicCheck::Private(reason),
        (None, None) => PublicCheck::Unknown("no repository to ask".to_owned()),
    }
}

// --- checkpoint restore ------------------------------------------------------

/// The annotation that makes an image a checkpoint (checkpointctl's
/// `CheckpointAnnotationName`, on the image's index or manifest).
pub const CHECKPOINT_ANNOTATION: &str = "io.kubernetes.cri-o.annotations.checkpoint.name";

/// Whether the runtime restores a container from a checkpoint when
/// `CreateContainer` names a checkpoint image (or a checkpoint archive's
/// path) as its image. A restore runs the image the checkpoint names in
/// its `config.dump` — any image on the node — which the guard never sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Restore {
    /// It does not.
    Off,
    /// It may; why the guard thinks so.
    Possible(String),
}

/// Tells from the runtime's `Version` and `Status{verbose}` info whether
/// it may restore through `CreateContainer`:
///
/// - containerd 1.x: never. containerd 2.x restores checkpoint images in
///   `CreateContainer`; from 2.2.7 and 2.3.4 only with
///   `enable_experimental_restore_via_create`, which its config then shows.
/// - CRI-O: with `enable_criu_support`.
/// - Anything unknown (another runtime, no config in the answer): possible.
pub fn restore_via_create(version: &VersionResponse, info: &HashMap<String, String>) -> Restore {
    let config = info
        .get("config")
        .and_then(|c| serde_json::from_str::<serde_json::Value>(c).ok());
    let flag = |key: &str| config.as_ref().and_then(|c| find_flag(c, key));
    let runtime = format!("{} {}", version.runtime_name, version.runtime_version);
    match version.runtime_name.as_str() {
        "containerd" => {
            if major_version(&version.runtime_version).is_some_and(|major| major < 2) {
                return Restore::Off;
            }
            match flag("enable_experimental_restore_via_create") {
                Some(false) => Restore::Off,
                Some(true) => Restore::Possible(format!(
                    "{runtime} has enable_experimental_restore_via_create on"
                )),
                None => Restore::Possible(format!(
                    "{runtime} restores checkpoint images in CreateContainer unless its config turns it off"
                )),
            }
        }
        "cri-o" => match flag("enable_criu_support") {
            Some(false) => Restore::Off,
            Some(true) => Restore::Possible(format!("{runtime} has enable_criu_support on")),
            None => Restore::Possible(format!(
                "{runtime} does not show whether enable_criu_support is on"
            )),
        },
        _ => Restore::Possible(format!(
            "{runtime:?} is not a runtime the guard knows to never restore checkpoints"
        )),
    }
}

/// A boolean anywhere in a JSON config under `key`, spelled in snake_case
/// or camelCase.
fn find_flag(value: &serde_json::Value, key: &str) -> Option<bool> {
    let wanted: String = key.chars().filter(|c| *c != '_').collect();
    match value {
        serde_json::Value::Object(map) => map.iter().find_map(|(k, v)| {
            let same = k
                .chars()
                .filter(|c| *c != '_')
                .collect::<String>()
                .eq_ignore_ascii_case(&wanted);
            if same && let Some(b) = v.as_bool() {
                return Some(b);
            }
            find_flag(v, key)
        }),
        serde_json::Value::Array(items) => items.iter().find_map(|v| find_flag(v, key)),
        _ => None,
    }
}

/// `v2.3.1`, `2.0.0-rc.1`, `1.6.20~ds1` → the major version.
fn major_version(version: &str) -> Option<u32> {
    let digits: String = version
        .trim_start_matches('v')
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Why `CreateContainer`'s image would make a runtime that restores through
/// `CreateContainer` restore a checkpoint: a path (the runtime opens a
/// checkpoint archive at it), or an image carrying [`CHECKPOINT_ANNOTATION`]
/// (`annotations`: what the runtime shows of the image's and its
/// manifest's annotations). `None`: an ordinary image.
pub fn checkpoint(requested: &str, annotations: &[&HashMap<String, String>]) -> Option<String> {
    if requested.starts_with('/') || requested.starts_with("./") || requested.starts_with("../") {
        return Some(format!(
            "{requested:?} is a path: the runtime would restore a checkpoint archive from it"
        ));
    }
    annotations
        .iter()
        .find_map(|a| a.get(CHECKPOINT_ANNOTATION))
        .map(|container| {
            format!(
                "{requested:?} is a checkpoint image (of container {container:?}): the runtime would restore it onto the image its checkpoint names, which the guard does not see"
            )
        })
}

/// The top-level `annotations` of an OCI index or manifest (what a runtime
/// reads to tell a checkpoint image); none if it does not parse.
pub fn manifest_annotations(body: &[u8]) -> HashMap<String, String> {
    #[derive(serde::Deserialize)]
    struct Annotated {
        #[serde(default)]
        annotations: HashMap<String, String>,
    }
    serde_json::from_slice::<Annotated>(body)
        .map(|a| a.annotations)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::VerifyPolicy;

    fn r(s: &str) -> ImageRef {
        ImageRef::parse(s).expect("reference")
    }

    const UID: &str = "0d7c6a43-1c5e-4b5e-9a83-6f7d3a2c1b10";
    const STATIC: &str = "3f2b9c4d5e6f708192a3b4c5d6e7f809";

    #[test]
    fn identity_table() {
        let listed = Listing::Listed {
            namespace: "team",
            name: "alice",
        };
        let mismatch = |listed: &str| {
            Identity::Unconfirmed(Unconfirmed::Mismatch {
                uid: UID.into(),
                listed: listed.into(),
            })
        };
        // (claimed namespace, name, uid, listing, identity)
        let table = [
            ("team", "alice", UID, listed, Identity::Confirmed),
            ("eve", "forged", UID, listed, mismatch("team/alice")),
            ("team", "alice-2", UID, listed, mismatch("team/alice")),
            ("eve", "alice", UID, listed, mismatch("team/alice")),
            (
                "team",
                "alice",
                UID,
                Listing::Missing,
                Identity::Unconfirmed(Unconfirmed::Missing { uid: UID.into() }),
            ),
            (
                "team",
                "alice",
                UID,
                Listing::NotLoaded,
                Identity::Unconfirmed(Unconfirmed::NotLoaded),
            ),
            (
                "team",
                "alice",
                "",
                Listing::Missing,
                Identity::Unconfirmed(Unconfirmed::Missing { uid: String::new() }),
            ),
            // Static pods: by their mirror pod, or as the runtime says
            // when the API has none.
            (
                "kube-system",
                "etcd-a",
                STATIC,
                Listing::NotLoaded,
                Identity::Static,
            ),
            (
                "kube-system",
                "etcd-a",
                STATIC,
                Listing::Missing,
                Identity::Static,
            ),
            (
                "kube-system",
                "etcd-a",
                STATIC,
                Listing::Listed {
                    namespace: "kube-system",
                    name: "etcd-a",
                },
                Identity::Confirmed,
            ),
            (
                "eve",
                "etcd-a",
                STATIC,
                Listing::Listed {
                    namespace: "kube-system",
                    name: "etcd-a",
                },
                Identity::Unconfirmed(Unconfirmed::Mismatch {
                    uid: STATIC.into(),
                    listed: "kube-system/etcd-a".into(),
                }),
            ),
        ];
        for (namespace, name, uid, listing, want) in table {
            assert_eq!(
                identity(namespace, name, uid, listing),
                want,
                "{namespace}/{name} {uid} {listing:?}"
            );
        }
        assert!(!is_static_pod_uid("3F2B9C4D5E6F708192A3B4C5D6E7F809"));
        assert!(!is_static_pod_uid(&STATIC[1..]));
    }

    #[test]
    fn judge_table() {
        let policy = GuardPolicy {
            namespaces: [
                ("trusted".to_owned(), VerifyPolicy::NeverVerify),
                ("strict".to_owned(), VerifyPolicy::AlwaysVerify),
            ]
            .into(),
            ..GuardPolicy::default()
        };
        let private = [r("h.io/team/app:v1")];
        let creds = Some(Provenance::Credentials);
        let public = Some(Provenance::Anonymous);
        let confirmed = Identity::Confirmed;
        let stat = Identity::Static;
        let mismatch = Identity::Unconfirmed(Unconfirmed::Mismatch {
            uid: UID.into(),
            listed: "team/alice".into(),
        });
        let loading = Identity::Unconfirmed(Unconfirmed::NotLoaded);
        let pod = |namespace, identity| {
            Some(Pod {
                namespace,
                identity,
            })
        };
        use Decision::*;
        let no = Refused(Refusal::NoVerification);
        // (pod, provenance, verified, decision)
        let table: Vec<(Option<Pod<'_>>, Option<Provenance>, bool, Decision)> = vec![
            (pod("team", &confirmed), creds, true, Verified),
            (pod("team", &confirmed), creds, false, no.clone()),
            (pod("team", &confirmed), None, false, NotRequired),
            (pod("team", &confirmed), public, false, NotRequired),
            (pod("team", &stat), creds, true, Verified),
            // A borrowed uid's verification counts for nothing.
            (
                pod("team", &mismatch),
                creds,
                true,
                Refused(Refusal::Unconfirmed(Unconfirmed::Mismatch {
                    uid: UID.into(),
                    listed: "team/alice".into(),
                })),
            ),
            (pod("team", &mismatch), creds, false, no.clone()),
            (
                pod("team", &loading),
                creds,
                true,
                Refused(Refusal::Unconfirmed(Unconfirmed::NotLoaded)),
            ),
            // Images that need no verification need no identity.
            (pod("team", &loading), None, false, NotRequired),
            (pod("team", &mismatch), public, false, NotRequired),
            // A claimed namespace's leniency needs a confirmed pod...
            (pod("trusted", &confirmed), creds, false, NotRequired),
            (pod("trusted", &mismatch), creds, false, no.clone()),
            // ...and its strictness holds regardless.
            (pod("strict", &confirmed), None, false, no.clone()),
            (pod("strict", &mismatch), None, false, no.clone()),
            (pod("strict", &loading), None, false, no.clone()),
            // No pod at all: the node-wide policy.
            (None, creds, true, no.clone()),
            (None, None, false, NotRequired),
        ];
        for (i, (pod, provenance, verified, want)) in table.into_iter().enumerate() {
            assert_eq!(
                judge(&policy, pod, &private, provenance, verified),
                want,
                "row {i}: {pod:?} {provenance:?} {verified}"
            );
        }
    }

    #[test]
    fn what_a_pull_brought() {
        let pulled = r("h.io/team/app:v2");
        // (names of the image after the pull, recorded before, brought)
        let table = [
            (vec![r("h.io/team/app:v2")], false, true),
            (
                vec![r("h.io/team/app:v1"), r("h.io/team/app:v2")],
                false,
                true,
            ),
            (vec![r("h.io/team/app:v2")], true, false),
            // An image already known under another repository's name.
            (
                vec![r("h.io/evil/x:v1"), r("h.io/team/app:v2")],
                false,
                false,
            ),
            (
                vec![r("h.io/other/app:v2"), r("h.io/team/app:v2")],
                false,
                false,
            ),
        ];
        for (names, recorded, want) in table {
            assert_eq!(
                pull_brought_image(&pulled, &names, recorded),
                want,
                "{names:?} {recorded}"
            );
        }
    }

    #[test]
    fn trusted_repositories_and_targets() {
        const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
        const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
        let image = Image {
            id: "sha256:abc".into(),
            repo_tags: vec!["h.io/team/app:v1".into(), "h.io/evil/x:v1".into()],
            repo_digests: vec![format!("h.io/team/app@{D1}"), format!("h.io/evil/x@{D2}")],
            ..Image::default()
        };
        let names = crate::resolve::names_of(&image);
        let recorded: BTreeSet<String> = ["h.io/team/app".to_owned()].into();
        let trusted = trusted_repositories(Some(&recorded), &names);
        assert_eq!(trusted, recorded, "a recorded image: its record's");
        assert_eq!(
            trusted_repositories(Some(&BTreeSet::new()), &names),
            ["h.io/evil/x".to_owned(), "h.io/team/app".to_owned()].into(),
            "a record that lost its repositories: the image's names"
        );
        let target = |t: &[(ImageRef, String)]| {
            t.iter()
                .map(|(r, d)| (r.name(), d.clone()))
                .collect::<Vec<_>>()
        };
        // The caller's name is never a target, however it asks.
        for requested in [
            None,
            Some(r("h.io/evil/x:v1")),
            Some(r(&format!("h.io/evil/x@{D2}"))),
        ] {
            assert_eq!(
                target(&check_targets(&trusted, &image, requested.as_ref())),
                vec![("h.io/team/app".to_owned(), D1.to_owned())],
                "{requested:?}"
            );
        }
        // A trusted repository without a digest of its own: another
        // trusted one's.
        let two: BTreeSet<String> =
            ["h.io/team/app".to_owned(), "h.io/team/mirror".to_owned()].into();
        assert_eq!(
            target(&check_targets(
                &two,
                &image,
                Some(&r("h.io/team/mirror:v1"))
            )),
            vec![
                ("h.io/team/mirror".to_owned(), D1.to_owned()),
                ("h.io/team/app".to_owned(), D1.to_owned())
            ]
        );
        // No digest in any trusted repository: nothing to ask.
        let elsewhere: BTreeSet<String> = ["h.io/other/y".to_owned()].into();
        assert!(check_targets(&elsewhere, &image, None).is_empty());
    }

    #[test]
    fn combining_checks() {
        let granted = Checked::Answered(Access::Granted);
        let denied = Checked::Answered(Access::Denied {
            reason: "401".into(),
        });
        let gone = Checked::Answered(Access::NotFound {
            reason: "404".into(),
        });
        let failed = Checked::Failed("timeout".into());
        use CredentialCheck as C;
        use PublicCheck as P;
        // (results, credential check, public re-check)
        let table = [
            (
                vec![granted.clone()],
                C::Granted,
                P::Public("still public".into()),
            ),
            (
                vec![denied.clone(), granted.clone()],
                C::Granted,
                P::Public("still public".into()),
            ),
            (
                vec![denied.clone()],
                C::Denied("401".into()),
                P::Private("401".into()),
            ),
            (
                vec![gone.clone()],
                C::NotFound("404".into()),
                P::Public(String::new()),
            ),
            (
                vec![denied.clone(), gone.clone()],
                C::Denied("401".into()),
                P::Public(String::new()),
            ),
            (
                vec![failed.clone()],
                C::Unknown("timeout".into()),
                P::Unknown("timeout".into()),
            ),
            (
                vec![denied.clone(), failed.clone()],
                C::Unknown("timeout".into()),
                P::Unknown("timeout".into()),
            ),
            (
                vec![failed, granted],
                C::Granted,
                P::Public("still public".into()),
            ),
        ];
        for (results, credential, public) in table {
            assert_eq!(credential_check(&results), credential, "{results:?}");
            match (public_check(&results), public) {
                // The wording of a 404 does not matter here.
                (P::Public(_), P::Public(want)) if want.is_empty() => {}
                (got, want) => assert_eq!(got, want, "{results:?}"),
            }
        }
        assert!(matches!(credential_check(&[]), C::Unknown(_)));
        assert!(matches!(public_check(&[]), P::Unknown(_)));
    }

    #[test]
    fn restore_through_create_container() {
        let version = |name: &str, v: &str| VersionResponse {
            runtime_name: name.into(),
            runtime_version: v.into(),
            ..VersionResponse::default()
        };
        let config = |json: &str| -> HashMap<String, String> {
            [("config".to_owned(), json.to_owned())].into()
        };
        let none = HashMap::new();
        let off = |r: Restore| r == Restore::Off;
        // (version, status info, restore possible)
        let table = [
            (version("containerd", "1.6.20~ds1"), none.clone(), false),
            (version("containerd", "v1.7.27"), none.clone(), false),
            (
                version("containerd", "v2.0.5"),
                config(r#"{"containerd":{}}"#),
                true,
            ),
            (version("containerd", "v2.1.0"), none.clone(), true),
            (
                version("containerd", "v2.2.9"),
                config(r#"{"enableExperimentalRestoreViaCreate":false}"#),
                false,
            ),
            (
                version("containerd", "v2.3.4"),
                config(r#"{"runtime":{"enable_experimental_restore_via_create":true}}"#),
                true,
            ),
            (
                version("cri-o", "1.33.0"),
                config(r#"{"enable_criu_support":false}"#),
                false,
            ),
            (
                version("cri-o", "1.33.0"),
                config(r#"{"runtime":{"enableCriuSupport":true}}"#),
                true,
            ),
            (version("cri-o", "1.33.0"), none.clone(), true),
            (version("something", "1.0"), none.clone(), true),
            (version("containerd", "garbage"), config("not json"), true),
        ];
        for (version, info, possible) in table {
            let restore = restore_via_create(&version, &info);
            assert_eq!(
                !off(restore.clone()),
                possible,
                "{version:?} {info:?}: {restore:?}"
            );
        }
    }

    #[test]
    fn manifest_annotations_are_read_as_the_runtime_reads_them() {
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[],"annotations":{{"{CHECKPOINT_ANNOTATION}":"counter"}}}}"#
        );
        assert_eq!(
            manifest_annotations(index.as_bytes())
                .get(CHECKPOINT_ANNOTATION)
                .map(String::as_str),
            Some("counter")
        );
        assert!(manifest_annotations(br#"{"schemaVersion":2}"#).is_empty());
        assert!(manifest_annotations(b"not json").is_empty());
        assert!(manifest_annotations(br#"{"annotations":{"a":1}}"#).is_empty());
    }

    #[test]
    fn checkpoint_images_and_archives() {
        let marked: HashMap<String, String> =
            [(CHECKPOINT_ANNOTATION.to_owned(), "counter".to_owned())].into();
        let plain: HashMap<String, String> =
            [("org.opencontainers.image.title".to_owned(), "x".to_owned())].into();
        // (requested, annotations, a checkpoint)
        type Annotations<'a> = Vec<&'a HashMap<String, String>>;
        let table: [(&str, Annotations<'_>, bool); 6] = [
            ("sha256:abc", vec![], false),
            ("h.io/app:v1", vec![&plain], false),
            ("h.io/app:v1", vec![&plain, &marked], true),
            ("/var/lib/kubelet/checkpoints/c.tar", vec![], true),
            ("./c.tar", vec![], true),
            ("../c.tar", vec![], true),
        ];
        for (requested, annotations, want) in table {
            assert_eq!(
                checkpoint(requested, &annotations).is_some(),
                want,
                "{requested} {annotations:?}"
            );
        }
    }
}
