//! Which image a CRI call is about, and by which names to judge it.
//!
//! A caller names an image with any string the runtime resolves: a tag, a
//! digest reference, a full or short image id (`sha256:4f1f2b9525c2`, or
//! just hex). Parsed as a reference, a short id is a tag of
//! `docker.io/library/sha256` — which says nothing about the image the
//! runtime will use. So every decision starts from the image the runtime
//! resolved (its `ImageStatus` answer) and its own names; the requested
//! string counts only when it is one of them.

use credlet_proto::cri::Image;

use crate::reference::ImageRef;

/// A requested reference resolved against the image the runtime will use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The image's own names: its repo tags and repo digests, normalized,
    /// each once. Policies (the allowlist) apply to these.
    pub names: Vec<ImageRef>,
    /// The reference to check credentials against and to record: the
    /// requested one when its repository is one of the image's, else one of
    /// the image's own names (a repo digest first: it carries the manifest
    /// digest to check). `None` when the image has no name at all.
    pub reference: Option<ImageRef>,
}

/// The image's own names (repo tags, then repo digests), normalized,
/// without duplicates; names the runtime reports that do not parse are
/// left out.
pub fn names_of(image: &Image) -> Vec<ImageRef> {
    let mut names: Vec<ImageRef> = Vec::new();
    for name in image.repo_tags.iter().chain(image.repo_digests.iter()) {
        if let Ok(parsed) = ImageRef::parse(name)
            && !names.contains(&parsed)
        {
            names.push(parsed);
        }
    }
    names
}

/// Resolves `requested` (what the caller sent) against `image` (what the
/// runtime's `ImageStatus` returned for it).
pub fn resolve(requested: &str, image: &Image) -> Resolved {
    let names = names_of(image);
    let requested = ImageRef::parse(requested)
        .ok()
        .filter(|r| names.iter().any(|n| n.name() == r.name()));
    let reference = requested.or_else(|| {
        names
            .iter()
            .find(|n| n.digest().is_some())
            .or_else(|| names.first())
            .cloned()
    });
    Resolved { names, reference }
}

/// The manifest digest to check: the repo digest of the reference's
/// repository, else the reference's own digest, else any repo digest.
pub fn manifest_digest(reference: &ImageRef, image: &Image) -> Option<String> {
    let name = reference.name();
    let digest_of = |repo_digest: &String| {
        ImageRef::parse(repo_digest)
            .ok()
            .and_then(|r| Some((r.name(), r.digest()?.to_owned())))
    };
    image
        .repo_digests
        .iter()
        .filter_map(digest_of)
        .find(|(n, _)| *n == name)
        .map(|(_, d)| d)
        .or_else(|| reference.digest().map(str::to_owned))
        .or_else(|| {
            image
                .repo_digests
                .iter()
                .filter_map(digest_of)
                .map(|(_, d)| d)
                .next()
        })
}

/// Whether a pod's spec image (a container's, or an image volume's
/// reference) refers to the image a CRI call is about. A reference with
/// neither tag nor digest is its `:latest` tag, as the kubelet asks for it.
pub fn refers_to(spec_image: &str, requested: &str, image: &Image) -> bool {
    if spec_image == requested || spec_image == image.id {
        return true;
    }
    let Ok(spec) = ImageRef::parse(spec_image) else {
        return false;
    };
    let spec_full = with_default_tag(&spec);
    if ImageRef::parse(requested).is_ok_and(|r| with_default_tag(&r) == spec_full) {
        return true;
    }
    image
        .repo_tags
        .iter()
        .chain(image.repo_digests.iter())
        .any(|r| ImageRef::parse(r).is_ok_and(|r| with_default_tag(&r) == spec_full))
}

/// The reference in full, `:latest` when it names neither tag nor digest.
fn with_default_tag(reference: &ImageRef) -> String {
    if reference.tag().is_none() && reference.digest().is_none() {
        format!("{}:latest", reference.name())
    } else {
        reference.to_string()
    }
}

/// Whether an image known by `names` is what a pull of `pulled` produced:
/// the same repository with the same tag or the same digest.
pub fn pulled_as(pulled: &ImageRef, names: &[ImageRef]) -> bool {
    names.iter().any(|n| {
        n.name() == pulled.name()
            && ((pulled.tag().is_some() && n.tag() == pulled.tag())
                || (pulled.digest().is_some() && n.digest() == pulled.digest())
                // `registry/app` alone pulls `:latest`.
                || (pulled.tag().is_none()
                    && pulled.digest().is_none()
                    && n.tag() == Some("latest")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    const ID: &str = "sha256:4f1f2b9525c2aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn image(tags: &[&str], digests: &[&str]) -> Image {
        Image {
            id: ID.into(),
            repo_tags: tags.iter().map(|s| s.to_string()).collect(),
            repo_digests: digests.iter().map(|s| s.to_string()).collect(),
            ..Image::default()
        }
    }

    fn r(s: &str) -> ImageRef {
        ImageRef::parse(s).expect("reference")
    }

    #[test]
    fn resolution_table() {
        let private = image(
            &["127.0.0.1:5000/team/app:v1"],
            &[&format!("127.0.0.1:5000/team/app@{D1}")],
        );
        let hub = image(&["docker.io/library/nginx:1.27"], &[]);
        let nameless = image(&[], &[]);
        let app_digest = format!("127.0.0.1:5000/team/app@{D1}");
        // (requested, image, names, reference judged by)
        let table: &[(&str, &Image, &[&str], Option<&str>)] = &[
            // A tag of the image: itself.
            (
                "127.0.0.1:5000/team/app:v1",
                &private,
                &["127.0.0.1:5000/team/app:v1", &app_digest],
                Some("127.0.0.1:5000/team/app:v1"),
            ),
            // Short, full and bare ids: the image's own name, digest first.
            (
                "sha256:4f1f2b9525c2",
                &private,
                &["127.0.0.1:5000/team/app:v1", &app_digest],
                Some(&app_digest),
            ),
            (
                ID,
                &private,
                &["127.0.0.1:5000/team/app:v1", &app_digest],
                Some(&app_digest),
            ),
            (
                "4f1f2b9525c2",
                &private,
                &["127.0.0.1:5000/team/app:v1", &app_digest],
                Some(&app_digest),
            ),
            // Docker Hub normalization still matches.
            (
                "nginx:1.27",
                &hub,
                &["docker.io/library/nginx:1.27"],
                Some("docker.io/library/nginx:1.27"),
            ),
            // A name the image does not carry.
            (
                "docker.io/library/nginx:1.27",
                &private,
                &["127.0.0.1:5000/team/app:v1", &app_digest],
                Some(&app_digest),
            ),
            // No names at all.
            ("sha256:4f1f2b9525c2", &nameless, &[], None),
            ("", &nameless, &[], None),
        ];
        for (requested, image, names, reference) in table {
            let resolved = resolve(requested, image);
            let want: Vec<ImageRef> = names.iter().map(|n| r(n)).collect();
            assert_eq!(resolved.names, want, "{requested}");
            assert_eq!(resolved.reference, reference.map(r), "{requested}");
        }
    }

    #[test]
    fn names_are_normalized_and_unique() {
        let img = image(
            &["nginx:1.27", "docker.io/library/nginx:1.27", "not a name"],
            &[&format!("nginx@{D1}")],
        );
        assert_eq!(
            names_of(&img),
            vec![r("docker.io/library/nginx:1.27"), r(&format!("nginx@{D1}"))]
        );
    }

    #[test]
    fn manifest_digest_prefers_the_references_repository() {
        let img = image(
            &[],
            &[&format!("h.io/other@{D2}"), &format!("h.io/app@{D1}")],
        );
        assert_eq!(
            manifest_digest(&r("h.io/app:v1"), &img).as_deref(),
            Some(D1)
        );
        assert_eq!(manifest_digest(&r("h.io/x:v1"), &img).as_deref(), Some(D2));
        assert_eq!(
            manifest_digest(&r(&format!("h.io/x@{D1}")), &image(&[], &[])).as_deref(),
            Some(D1)
        );
        assert_eq!(manifest_digest(&r("h.io/x:v1"), &image(&[], &[])), None);
    }

    #[test]
    fn pulled_as_table() {
        let names = [r("h.io/app:v1"), r(&format!("h.io/app@{D1}"))];
        for (pulled, want) in [
            ("h.io/app:v1", true),
            ("h.io/app:v2", false),
            (&format!("h.io/app@{D1}") as &str, true),
            (&format!("h.io/app@{D2}"), false),
            (&format!("h.io/app:v9@{D1}"), true),
            ("h.io/other:v1", false),
            ("h.io/app", false),
        ] {
            assert_eq!(pulled_as(&r(pulled), &names), want, "{pulled}");
        }
        assert!(pulled_as(&r("h.io/app"), &[r("h.io/app:latest")]));
    }

    #[test]
    fn spec_images_refer_to_the_image() {
        let img = image(&["docker.io/library/nginx:1.27"], &[&format!("nginx@{D1}")]);
        assert!(refers_to("nginx:1.27", "whatever", &img));
        assert!(refers_to(ID, "whatever", &img));
        assert!(refers_to("x", "x", &img));
        assert!(refers_to(&format!("nginx@{D1}"), "whatever", &img));
        assert!(!refers_to("nginx:1.28", "whatever", &img));
        // A tagless spec image is its `:latest`, as the kubelet asks for it.
        let latest = image(&["h.io/team/app:latest"], &[]);
        for (spec, requested, want) in [
            ("h.io/team/app", "h.io/team/app:latest", true),
            ("h.io/team/app", "whatever", true),
            ("h.io/team/app:latest", "h.io/team/app", true),
            ("h.io/team/app:v1", "h.io/team/app:latest", false),
            ("h.io/team/other", "h.io/team/app:latest", false),
        ] {
            assert_eq!(
                refers_to(spec, requested, &latest),
                want,
                "{spec} {requested}"
            );
        }
        let v1 = image(&["h.io/team/app:v1"], &[]);
        assert!(!refers_to("h.io/team/app", "whatever", &v1));
    }
}
