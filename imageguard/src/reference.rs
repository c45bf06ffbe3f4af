//! Image references, normalized the way docker and containerd do it, and the
//! KEP-2535 allowlist rule.
//!
//! Grammar (distribution's `reference` package):
//!
//! ```text
//! reference      := name [ ":" tag ] [ "@" digest ]
//! name           := [ domain "/" ] path-component *( "/" path-component )
//! domain         := host [ ":" port ]
//! host           := domain-name | "[" ipv6 "]"
//! domain-name    := domain-component *( "." domain-component )
//! domain-component := [a-zA-Z0-9] | [a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]
//! path-component := [a-z0-9]+ *( separator [a-z0-9]+ )
//! separator      := "." | "_" | "__" | "-"+
//! tag            := [\w][\w.-]{0,127}
//! digest         := algorithm ":" hex       (sha256: 64, sha384: 96, sha512: 128 lowercase hex)
//! ```
//!
//! Normalization (`ParseNormalizedNamed` of distribution/reference v0.6.0,
//! which the kubelet and containerd 2 use): when the first `/`-separated
//! component is not a host (it contains neither `.` nor `:`, is not
//! `localhost` and has no upper-case letter), the registry is `docker.io`;
//! `index.docker.io` becomes `docker.io`; a single-component name on
//! `docker.io` gets `library/`. The host keeps its case. A reference that is
//! exactly 64 lowercase hexadecimal digits is an image ID, not a name (but
//! `<64 hex>:tag` is a name). The repository path (after normalization,
//! without the registry) is at most 255 bytes.

use std::collections::BTreeSet;
use std::fmt;

/// Longest reference string [`ImageRef::parse`] accepts.
pub const MAX_REFERENCE_LEN: usize = 4096;

/// Longest repository path after normalization (`library/nginx`, without the
/// registry), as in distribution/reference v0.6.0
/// (`RepositoryNameTotalLengthMax`; older versions counted the registry too).
pub const MAX_NAME_LEN: usize = 255;

/// Longest tag.
const MAX_TAG_LEN: usize = 128;

/// The registry of names without a host part.
pub const DEFAULT_REGISTRY: &str = "docker.io";

/// Docker Hub's legacy registry name, normalized to [`DEFAULT_REGISTRY`].
const LEGACY_DEFAULT_REGISTRY: &str = "index.docker.io";

/// Why a reference or allowlist entry was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// The input is empty.
    #[error("image reference is empty")]
    Empty,
    /// The input is longer than [`MAX_REFERENCE_LEN`].
    #[error("image reference is {len} bytes long, more than the {max} allowed")]
    TooLong {
        /// Length of the input.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The normalized repository path is longer than [`MAX_NAME_LEN`].
    #[error("repository name {name:?} is {len} bytes long, more than the {max} allowed")]
    NameTooLong {
        /// The (shortened) name.
        name: String,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The registry host (or port) is malformed.
    #[error("invalid registry host {host:?}: {reason}")]
    InvalidRegistry {
        /// The (shortened) host part.
        host: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A path component of the repository is malformed.
    #[error("invalid repository path component {component:?} in {reference:?}: {reason}")]
    InvalidPathComponent {
        /// The (shortened) component.
        component: String,
        /// The (shortened) reference.
        reference: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The tag is malformed.
    #[error("invalid tag {tag:?}: {reason}")]
    InvalidTag {
        /// The (shortened) tag.
        tag: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The digest is malformed or uses an unsupported algorithm.
    #[error("invalid digest {digest:?}: {reason}")]
    InvalidDigest {
        /// The (shortened) digest.
        digest: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The reference is a 64-hex-digit string, i.e. an image ID, not a name.
    #[error("{reference:?} is an image ID (64 hexadecimal digits), not a repository name")]
    ImageId {
        /// The (shortened) input.
        reference: String,
    },
    /// An allowlist entry breaks the allowlist rules.
    #[error("invalid allowlist entry {entry:?}: {reason}")]
    InvalidAllowlistEntry {
        /// The (shortened) entry.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Shortens user input quoted in error messages.
fn shorten(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// A parsed, normalized image reference such as
/// `docker.io/library/nginx:1.27@sha256:…`.
///
/// Invariant: every field satisfies the grammar in the module docs, so
/// [`ImageRef::name`] and the [`Display`](fmt::Display) form are always valid,
/// normalized references that parse back to an equal value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageRef {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

impl ImageRef {
    /// Parses and normalizes a reference (see the module docs). Accepts
    /// `name`, `name:tag`, `name@digest` and `name:tag@digest`.
    pub fn parse(reference: &str) -> Result<Self, ReferenceError> {
        if reference.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if reference.len() > MAX_REFERENCE_LEN {
            return Err(ReferenceError::TooLong {
                len: reference.len(),
                max: MAX_REFERENCE_LEN,
            });
        }
        // Only the whole input: `<64 hex>:tag` is a name on Docker Hub.
        if reference.len() == 64
            && reference
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(ReferenceError::ImageId {
                reference: shorten(reference),
            });
        }
        let (rest, digest) = match reference.split_once('@') {
            Some((rest, digest)) => {
                validate_digest(digest)?;
                (rest, Some(digest.to_string()))
            }
            None => (reference, None),
        };
        // A ':' after the last '/' separates the tag; an earlier one is a port.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                let tag = &rest[at + 1..];
                validate_tag(tag)?;
                (&rest[..at], Some(tag.to_string()))
            }
            None => (rest, None),
        };
        if name.is_empty() {
            return Err(ReferenceError::InvalidPathComponent {
                component: String::new(),
                reference: shorten(reference),
                reason: "the repository name is empty",
            });
        }

        let (registry, repository) = split_registry(name);
        validate_registry(registry)?;
        validate_repository(repository, reference)?;
        let registry = if registry == LEGACY_DEFAULT_REGISTRY {
            DEFAULT_REGISTRY
        } else {
            registry
        };
        let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository.to_string()
        };
        if repository.len() > MAX_NAME_LEN {
            return Err(ReferenceError::NameTooLong {
                name: shorten(&format!("{registry}/{repository}")),
                len: repository.len(),
                max: MAX_NAME_LEN,
            });
        }
        Ok(Self {
            registry: registry.to_string(),
            repository,
            tag,
            digest,
        })
    }

    /// The registry host, with port if any (`docker.io`, `127.0.0.1:5000`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path inside the registry (`library/nginx`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if the reference has one.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest (`sha256:…`), if the reference has one.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// The normalized repository name `registry/repository`, without tag or
    /// digest: what KEP-2535 allowlists and the kubelet's records use.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The same repository (and tag) pinned to `digest`.
    pub fn with_digest(&self, digest: &str) -> Result<ImageRef, ReferenceError> {
        validate_digest(digest)?;
        Ok(Self {
            digest: Some(digest.to_string()),
            ..self.clone()
        })
    }

    /// The same repository without tag and with `digest`: `registry/repo@digest`.
    pub fn digest_only(&self, digest: &str) -> Result<ImageRef, ReferenceError> {
        validate_digest(digest)?;
        Ok(Self {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: None,
            digest: Some(digest.to_string()),
        })
    }
}

impl fmt::Display for ImageRef {
    /// The full normalized reference: `registry/repository[:tag][@digest]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for ImageRef {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Splits `name` into (registry, repository) following docker's rule.
fn split_registry(name: &str) -> (&str, &str) {
    match name.split_once('/') {
        Some((first, rest)) if is_host_component(first) => (first, rest),
        _ => (DEFAULT_REGISTRY, name),
    }
}

/// Whether the first component of a name is a registry host.
fn is_host_component(first: &str) -> bool {
    first.contains(['.', ':'])
        || first == "localhost"
        || first.bytes().any(|b| b.is_ascii_uppercase())
}

/// Checks `host[:port]`.
fn validate_registry(registry: &str) -> Result<(), ReferenceError> {
    let invalid = |reason| ReferenceError::InvalidRegistry {
        host: shorten(registry),
        reason,
    };
    if registry.is_empty() {
        return Err(invalid("empty host"));
    }
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return Err(invalid("unterminated IPv6 address"));
        };
        // distribution's `\[(?:[a-fA-F0-9:]+)\]`: hex digits and colons,
        // not necessarily a valid address (no dotted IPv4 tail).
        if ip.is_empty() || !ip.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
            return Err(invalid("not an IPv6 address (hex digits and ':')"));
        }
        match after {
            "" => ("", None),
            p => match p.strip_prefix(':') {
                Some(port) => ("", Some(port)),
                None => return Err(invalid("unexpected characters after the IPv6 address")),
            },
        }
    } else {
        match registry.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (registry, None),
        }
    };
    if let Some(port) = port
        && (port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(invalid("the port must be decimal digits"));
    }
    if !registry.starts_with('[') {
        if host.is_empty() {
            return Err(invalid("empty host"));
        }
        for component in host.split('.') {
            let bytes = component.as_bytes();
            let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
                return Err(invalid("empty domain component"));
            };
            if !first.is_ascii_alphanumeric() || !last.is_ascii_alphanumeric() {
                return Err(invalid(
                    "domain components must start and end with a letter or digit",
                ));
            }
            if !bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
            {
                return Err(invalid(
                    "domain components may only hold letters, digits and '-'",
                ));
            }
        }
    }
    Ok(())
}

/// Checks the repository path (after the registry).
fn validate_repository(repository: &str, reference: &str) -> Result<(), ReferenceError> {
    for component in repository.split('/') {
        if let Err(reason) = validate_path_component(component) {
            return Err(ReferenceError::InvalidPathComponent {
                component: shorten(component),
                reference: shorten(reference),
                reason,
            });
        }
    }
    Ok(())
}

/// `[a-z0-9]+ ( ("." | "_" | "__" | "-"+) [a-z0-9]+ )*`
fn validate_path_component(component: &str) -> Result<(), &'static str> {
    let bytes = component.as_bytes();
    if bytes.is_empty() {
        return Err("empty path component");
    }
    if bytes.iter().any(u8::is_ascii_uppercase) {
        return Err("repository names must be lowercase");
    }
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !bytes
        .iter()
        .all(|&b| alnum(b) || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("only lowercase letters, digits, '.', '_', '__' and '-' are allowed");
    }
    let mut i = 0;
    loop {
        let start = i;
        while i < bytes.len() && alnum(bytes[i]) {
            i += 1;
        }
        if i == start {
            return Err("path components must start and end with a lowercase letter or digit");
        }
        if i == bytes.len() {
            return Ok(());
        }
        match bytes[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < bytes.len() && bytes[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < bytes.len() && bytes[i] == b'-' {
                    i += 1;
                }
            }
            _ => return Err("only lowercase letters, digits, '.', '_', '__' and '-' are allowed"),
        }
        if i == bytes.len() || !alnum(bytes[i]) {
            return Err("separators ('.', '_', '__', '-') must stand between letters or digits");
        }
    }
}

/// `[\w][\w.-]{0,127}`
fn validate_tag(tag: &str) -> Result<(), ReferenceError> {
    let invalid = |reason| ReferenceError::InvalidTag {
        tag: shorten(tag),
        reason,
    };
    let bytes = tag.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let Some(&first) = bytes.first() else {
        return Err(invalid("empty tag"));
    };
    if bytes.len() > MAX_TAG_LEN {
        return Err(invalid("tags are at most 128 characters long"));
    }
    if !word(first) {
        return Err(invalid("tags must start with a letter, digit or '_'"));
    }
    if !bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-') {
        return Err(invalid(
            "tags may only hold letters, digits, '_', '.' and '-'",
        ));
    }
    Ok(())
}

/// Checks `algorithm:hex` for the algorithms registries use.
fn validate_digest(digest: &str) -> Result<(), ReferenceError> {
    let invalid = |reason| ReferenceError::InvalidDigest {
        digest: shorten(digest),
        reason,
    };
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return Err(invalid("expected <algorithm>:<hex>"));
    };
    let expected = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return Err(invalid("unsupported algorithm (sha256, sha384 or sha512)")),
    };
    if hex.len() != expected {
        return Err(invalid(
            "wrong number of hexadecimal digits for the algorithm",
        ));
    }
    if !hex
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(invalid("the digest must be lowercase hexadecimal"));
    }
    Ok(())
}

/// Whether `s` is a well-formed digest (`sha256:<64 lowercase hex>`,
/// `sha384:<96>`, `sha512:<128>`).
pub fn is_digest(s: &str) -> bool {
    validate_digest(s).is_ok()
}

/// The KEP-2535 allowlist of images that need no credential verification
/// (`NeverVerifyAllowlistedImages`).
///
/// Entries are normalized repository names without tag or digest
/// (`registry.example/team/app`), or a prefix ending in the only wildcard, a
/// trailing `/*` path segment meaning "anything below"
/// (`registry.example/team/*`, `registry.example/*`, `docker.io/library/*`).
/// Stricter than the kubelet in two ways: a wildcard prefix must start with
/// a registry host and hold only valid path components, so `nginx/*` (which
/// could never match a normalized name) is rejected instead of silently
/// matching nothing; and `index.docker.io` must be written `docker.io`.
/// Matching is exact string comparison on [`ImageRef::name`] (no case
/// folding of hosts: a differently spelled host is simply not allowlisted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    exact: BTreeSet<String>,
    /// Prefixes including their trailing '/'.
    prefixes: Vec<String>,
}

impl Allowlist {
    /// Parses allowlist entries; the first invalid entry fails the whole list.
    pub fn parse<I, S>(entries: I) -> Result<Self, ReferenceError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut list = Self::default();
        for entry in entries {
            list.add(entry.as_ref())?;
        }
        Ok(list)
    }

    /// Adds one entry.
    pub fn add(&mut self, entry: &str) -> Result<(), ReferenceError> {
        let invalid = |reason: &str| ReferenceError::InvalidAllowlistEntry {
            entry: shorten(entry),
            reason: reason.to_string(),
        };
        if entry.is_empty() {
            return Err(invalid("empty entry"));
        }
        if entry.len() > MAX_REFERENCE_LEN {
            return Err(invalid("longer than a repository name can be"));
        }
        if entry != entry.trim() {
            return Err(invalid("leading or trailing white space"));
        }
        let (name, wildcard) = match entry.strip_suffix("/*") {
            Some(prefix) => (prefix, true),
            None => (entry, false),
        };
        if name.contains('*') {
            return Err(invalid(
                "the only wildcard allowed is a trailing '/*' path segment",
            ));
        }
        if name.is_empty() {
            return Err(invalid(
                "a wildcard needs at least a registry host before '/*'",
            ));
        }
        if name.contains(['@']) {
            return Err(invalid("entries must not carry a digest"));
        }
        if wildcard {
            // A prefix: a registry host, optionally followed by path
            // components (`docker.io/library/*` is valid although
            // `docker.io/library` alone would normalize to
            // `docker.io/library/library`).
            let (host, path) = match name.split_once('/') {
                Some((host, path)) => (host, Some(path)),
                None => (name, None),
            };
            if !is_host_component(host) {
                return Err(invalid(
                    "a wildcard prefix must start with a registry host (containing '.' or ':', or 'localhost')",
                ));
            }
            validate_registry(host).map_err(|e| invalid(&e.to_string()))?;
            if host == LEGACY_DEFAULT_REGISTRY {
                return Err(invalid("use the normalized registry name docker.io"));
            }
            if let Some(path) = path {
                validate_repository(path, entry).map_err(|e| invalid(&e.to_string()))?;
            }
            self.prefixes.push(format!("{name}/"));
            return Ok(());
        }
        let parsed = ImageRef::parse(name).map_err(|e| invalid(&e.to_string()))?;
        if parsed.tag.is_some() || parsed.digest.is_some() {
            return Err(invalid("entries must not carry a tag or digest"));
        }
        let normalized = parsed.name();
        if normalized != name {
            return Err(invalid(&format!(
                "entries must be normalized repository names (did you mean {normalized:?}?)"
            )));
        }
        self.exact.insert(normalized);
        Ok(())
    }

    /// Whether `image`'s normalized repository name is allowlisted.
    pub fn matches(&self, image: &ImageRef) -> bool {
        let name = image.name();
        self.exact.contains(&name) || self.prefixes.iter().any(|p| name.starts_with(p.as_str()))
    }

    /// Whether the list has no entries.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D256: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn norm(s: &str) -> String {
        ImageRef::parse(s).unwrap().to_string()
    }

    #[test]
    fn docker_hub_normalization() {
        assert_eq!(norm("nginx"), "docker.io/library/nginx");
        assert_eq!(norm("nginx:1.27"), "docker.io/library/nginx:1.27");
        assert_eq!(norm("bitnami/nginx"), "docker.io/bitnami/nginx");
        assert_eq!(norm("docker.io/nginx"), "docker.io/library/nginx");
        assert_eq!(norm("index.docker.io/nginx"), "docker.io/library/nginx");
        assert_eq!(norm("index.docker.io/team/app:v1"), "docker.io/team/app:v1");
        assert_eq!(norm("docker.io/library/nginx"), "docker.io/library/nginx");
        assert_eq!(norm("a/b/c/d"), "docker.io/a/b/c/d");
    }

    #[test]
    fn hosts() {
        let r = ImageRef::parse("127.0.0.1:5000/team/app:v1").unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "team/app");
        assert_eq!(r.tag(), Some("v1"));
        assert_eq!(r.digest(), None);
        assert_eq!(r.name(), "127.0.0.1:5000/team/app");

        let r = ImageRef::parse("localhost/app").unwrap();
        assert_eq!((r.registry(), r.repository()), ("localhost", "app"));
        let r = ImageRef::parse("localhost:5000/app").unwrap();
        assert_eq!(r.registry(), "localhost:5000");
        // Single-component names on other registries get no `library/`.
        let r = ImageRef::parse("registry.k8s.io/pause:3.10").unwrap();
        assert_eq!(r.name(), "registry.k8s.io/pause");
        let r = ImageRef::parse("[::1]:5000/app").unwrap();
        assert_eq!(r.registry(), "[::1]:5000");
        let r = ImageRef::parse("[fe80::1]/app").unwrap();
        assert_eq!(r.registry(), "[fe80::1]");
        // Upper-case first component is a host (docker's rule).
        let r = ImageRef::parse("Registry/app").unwrap();
        assert_eq!(r.registry(), "Registry");
        let r = ImageRef::parse("My.Registry.example:443/app").unwrap();
        assert_eq!(r.registry(), "My.Registry.example:443");
        // Not a host: no '.', ':' and not localhost.
        let r = ImageRef::parse("foo/bar").unwrap();
        assert_eq!(r.name(), "docker.io/foo/bar");
    }

    #[test]
    fn tags_and_digests() {
        let r = ImageRef::parse(&format!("ghcr.io/o/app:v1.2_x-3@{D256}")).unwrap();
        assert_eq!(r.tag(), Some("v1.2_x-3"));
        assert_eq!(r.digest(), Some(D256));
        assert_eq!(r.to_string(), format!("ghcr.io/o/app:v1.2_x-3@{D256}"));
        let r = ImageRef::parse(&format!("app@{D256}")).unwrap();
        assert_eq!(r.to_string(), format!("docker.io/library/app@{D256}"));
        assert_eq!(r.tag(), None);
        let sha512 = format!("sha512:{}", "ab".repeat(64));
        let r = ImageRef::parse(&format!("h.io/x@{sha512}")).unwrap();
        assert_eq!(r.digest(), Some(sha512.as_str()));
        let max_tag = format!("_{}", "a".repeat(127));
        assert!(ImageRef::parse(&format!("h.io/x:{max_tag}")).is_ok());
        assert!(ImageRef::parse(&format!("h.io/x:{max_tag}a")).is_err());
    }

    #[test]
    fn round_trip_and_with_digest() {
        for s in [
            "nginx",
            "h.io:5000/a/b:c",
            "localhost/x@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            let r = ImageRef::parse(s).unwrap();
            assert_eq!(ImageRef::parse(&r.to_string()).unwrap(), r);
            let n = ImageRef::parse(&r.name()).unwrap();
            assert_eq!(n.name(), r.name());
        }
        let r = ImageRef::parse("h.io/a:v1").unwrap();
        let d = r.with_digest(D256).unwrap();
        assert_eq!(d.to_string(), format!("h.io/a:v1@{D256}"));
        let d = r.digest_only(D256).unwrap();
        assert_eq!(d.to_string(), format!("h.io/a@{D256}"));
        assert!(r.with_digest("sha256:abc").is_err());
        assert_eq!("h.io/a:v1".parse::<ImageRef>().unwrap(), r);
    }

    #[test]
    fn rejects_garbage() {
        let long = "a".repeat(MAX_REFERENCE_LEN + 1);
        let cases: Vec<(&str, &str)> = vec![
            ("", "empty"),
            (long.as_str(), "more than"),
            ("Nginx", "lowercase"),
            ("h.io/Team/app", "lowercase"),
            ("h.io/team//app", "empty path component"),
            ("h.io/team/app/", "empty path component"),
            ("/app", "empty path component"),
            ("h.io/-app", "start and end"),
            ("h.io/app-", "separators"),
            ("h.io/a..b", "separators"),
            ("h.io/a___b", "separators"),
            ("h.io/a_-b", "separators"),
            ("h.io/a b", "only lowercase"),
            ("h.io/a:", "empty tag"),
            ("h.io/a:-x", "must start"),
            ("h.io/a:x/y", "invalid"),
            ("h.io/a:x y", "tags may only"),
            ("h.io/a@sha256:abc", "wrong number"),
            ("h.io/a@md5:0123456789abcdef0123456789abcdef", "unsupported"),
            ("h.io/a@sha256", "expected"),
            (
                "h.io/a@sha256:0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef",
                "lowercase hex",
            ),
            ("h.io/a@", "expected"),
            ("h.io/a@x@y", "expected"),
            ("h.io:/a", "port"),
            ("h.io:ab/a", "port"),
            ("-h.io/a", "start and end"),
            ("h..io/a", "empty domain component"),
            ("h_x.io/a", "only hold"),
            ("[::1/a", "unterminated"),
            ("[zz]/a", "only lowercase"),
            ("[zz]:1/a", "not an IPv6"),
            ("[::1]x/a", "unexpected"),
            (
                "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "image ID",
            ),
            ("h.io/a\0", "only lowercase"),
            ("h.io/ä", "only lowercase"),
        ];
        for (input, want) in cases {
            let err = ImageRef::parse(input).expect_err(input).to_string();
            assert!(err.contains(want), "{input:?}: {err:?} lacks {want:?}");
        }
        let long_name = format!("h.io/{}", "a".repeat(MAX_NAME_LEN + 1));
        let err = ImageRef::parse(&long_name).unwrap_err();
        assert!(matches!(err, ReferenceError::NameTooLong { .. }), "{err}");
        // Docker Hub's `library/` counts too.
        let hub = "a".repeat(MAX_NAME_LEN + 1 - "library/".len());
        assert!(matches!(
            ImageRef::parse(&hub).unwrap_err(),
            ReferenceError::NameTooLong { .. }
        ));
    }

    /// Cases where an earlier version of this parser and distribution/reference
    /// v0.6.0 (what the kubelet and containerd 2 parse with) disagreed, and
    /// the rules around them.
    #[test]
    fn matches_distribution_reference() {
        let hex = "0123456789abcdef".repeat(4);
        let long_host = format!("{}.example", "r".repeat(60));
        let cases: Vec<(String, Result<String, &str>)> = vec![
            // Only the whole input can be an image ID.
            (hex.clone(), Err("image ID")),
            (
                format!("{hex}:v1"),
                Ok(format!("docker.io/library/{hex}:v1")),
            ),
            (
                format!("docker.io/library/{hex}"),
                Ok(format!("docker.io/library/{hex}")),
            ),
            (hex.to_uppercase(), Err("lowercase")),
            // Ports are any run of digits.
            ("h.io:123456/a".into(), Ok("h.io:123456/a".into())),
            ("h.io:0/a".into(), Ok("h.io:0/a".into())),
            // IPv6 hosts: hex digits and colons in brackets.
            ("[1:2]:5000/a".into(), Ok("[1:2]:5000/a".into())),
            ("[::FFFF]/a".into(), Ok("[::FFFF]/a".into())),
            ("[::ffff:1.2.3.4]/a".into(), Err("not an IPv6")),
            ("[]:5000/a".into(), Err("not an IPv6")),
            // Without '.' or ':' it is no host at all.
            ("[]/a".into(), Err("only lowercase")),
            // The 255-byte limit is on the path, not the registry.
            (
                format!("{long_host}/{}", "a".repeat(MAX_NAME_LEN)),
                Ok(format!("{long_host}/{}", "a".repeat(MAX_NAME_LEN))),
            ),
            (
                format!("{long_host}/{}", "a".repeat(MAX_NAME_LEN + 1)),
                Err("more than the 255"),
            ),
            // Names without '/' are Docker Hub names, whatever they look like.
            (
                "localhost:5000".into(),
                Ok("docker.io/library/localhost:5000".into()),
            ),
            (
                "example.com".into(),
                Ok("docker.io/library/example.com".into()),
            ),
            // Hosts keep their case; only `index.docker.io` is renamed.
            ("Docker.io/app".into(), Ok("Docker.io/app".into())),
            ("LOCALHOST/app".into(), Ok("LOCALHOST/app".into())),
            (
                "index.docker.io/library/nginx".into(),
                Ok("docker.io/library/nginx".into()),
            ),
            (
                "registry-1.docker.io/nginx".into(),
                Ok("registry-1.docker.io/nginx".into()),
            ),
            (
                "docker.io/library".into(),
                Ok("docker.io/library/library".into()),
            ),
            // Separators: '.', '_', '__', any run of '-'.
            ("h.io/a--b_c__d.e".into(), Ok("h.io/a--b_c__d.e".into())),
        ];
        for (input, want) in cases {
            match (ImageRef::parse(&input), want) {
                (Ok(r), Ok(want)) => assert_eq!(r.to_string(), want, "{input}"),
                (Err(e), Err(want)) => {
                    assert!(e.to_string().contains(want), "{input}: {e} lacks {want}")
                }
                (got, want) => panic!("{input}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn error_messages_are_short() {
        let input = format!("h.io/{}A", "a".repeat(3000));
        let err = ImageRef::parse(&input).unwrap_err().to_string();
        assert!(err.len() < 400, "{}", err.len());
    }

    #[test]
    fn digests() {
        assert!(is_digest(D256));
        assert!(is_digest(&format!("sha512:{}", "0".repeat(128))));
        assert!(is_digest(&format!("sha384:{}", "0".repeat(96))));
        assert!(!is_digest(&format!("sha512:{}", "0".repeat(64))));
        assert!(!is_digest("sha256:"));
        assert!(!is_digest(""));
        assert!(!is_digest(&D256.to_uppercase()));
        assert!(!is_digest(&format!("{D256}0")));
        assert!(!is_digest(&format!(" {D256}")));
    }

    #[test]
    fn allowlist_entries() {
        let list = Allowlist::parse([
            "registry.k8s.io/pause",
            "ghcr.io/org/*",
            "localhost:5000/*",
            "docker.io/library/nginx",
            "docker.io/library/*",
            "docker.io/bitnami/*",
        ])
        .unwrap();
        let m = |s: &str| list.matches(&ImageRef::parse(s).unwrap());
        assert!(m("registry.k8s.io/pause:3.10"));
        assert!(m(&format!("registry.k8s.io/pause@{D256}")));
        assert!(!m("registry.k8s.io/pause2"));
        assert!(!m("registry.k8s.io/pause/sub"));
        assert!(m("ghcr.io/org/app"));
        assert!(m("ghcr.io/org/team/app:v1"));
        assert!(!m("ghcr.io/org"));
        assert!(!m("ghcr.io/orgx/app"));
        assert!(!m("ghcr.io/other/app"));
        assert!(m("localhost:5000/x"));
        assert!(!m("localhost/x"));
        assert!(m("nginx:latest"));
        assert!(m("busybox"));
        assert!(m("bitnami/redis"));
        assert!(!m("other/redis"));
        assert!(!list.is_empty());
        assert!(Allowlist::default().is_empty());
        assert!(!Allowlist::default().matches(&ImageRef::parse("nginx").unwrap()));
    }

    #[test]
    fn allowlist_rejects_invalid_entries() {
        for (entry, want) in [
            ("", "empty"),
            ("*", "wildcard"),
            ("/*", "at least a registry host"),
            ("ghcr.io/*/app", "wildcard"),
            ("ghcr.io/org*", "wildcard"),
            ("ghcr.io/org/**", "wildcard"),
            ("ghcr.io/org/app:v1", "tag or digest"),
            (
                "ghcr.io/org/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "digest",
            ),
            ("nginx", "normalized"),
            ("library/nginx", "normalized"),
            ("index.docker.io/library/nginx", "normalized"),
            ("nginx/*", "registry host"),
            (" ghcr.io/a", "white space"),
            ("ghcr.io/a ", "white space"),
            ("ghcr.io/A", "lowercase"),
            ("ghcr.io/", "empty path component"),
            ("ghcr.io//*", "empty path component"),
            ("bad_host.io/*", "only hold"),
            ("index.docker.io/*", "docker.io"),
            ("index.docker.io/library/*", "docker.io"),
            ("ghcr.io/Org/*", "lowercase"),
            ("ghcr.io/a..b/*", "separators"),
            ("library/*", "registry host"),
        ] {
            let err = Allowlist::parse([entry]).expect_err(entry).to_string();
            assert!(err.contains(want), "{entry:?}: {err:?} lacks {want:?}");
        }
    }
}
