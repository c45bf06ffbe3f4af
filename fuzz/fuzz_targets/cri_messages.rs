//! Fuzzes the image guard proxy's reading of inspected CRI calls: the
//! unary gRPC frame (`grpc::unary_message`), then the message the guard
//! decodes from it — the ImageStatus, PullImage and CreateContainer
//! requests, the runtime's ImageStatus, PullImage and PodSandboxStatus
//! answers — and what the guard reads from them (`guard::image_uses`,
//! `resolve::*`), plus the routing of a request path (`proxy::Route::of`)
//! and the grpc-message encoding of the guard's own answers.
//!
//! No panics; a frame's message is exactly its announced bytes; what
//! decodes re-encodes to a message that decodes to itself; the images a
//! container uses are exactly its image and its image volumes'; a resolved
//! reference belongs to the image's names.
//!
//! Input: a message kind byte (mod 6), a flag byte (bit 0: the harness adds
//! a valid 5-byte frame prefix), then the body.
#![no_main]

use bytes::Bytes;
use credlet_imageguard::grpc::{self, Code, FrameError, MAX_INSPECTED_MESSAGE};
use credlet_imageguard::guard::image_uses;
use credlet_imageguard::proxy::Route;
use credlet_imageguard::reference::{ImageRef, is_digest};
use credlet_imageguard::resolve::{manifest_digest, pulled_as, refers_to, resolve};
use credlet_proto::cri::{
    CreateContainerRequest, Image, ImageStatusRequest, ImageStatusResponse,
    PodSandboxStatusResponse, PullImageRequest, PullImageResponse,
};
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// Decodes `M`; what decodes encodes back to an equal message.
fn decode<M: Message + Default + PartialEq + std::fmt::Debug>(message: &Bytes) -> Option<M> {
    let decoded = M::decode(message.clone()).ok()?;
    let framed = grpc::frame(&decoded);
    let again = M::decode(grpc::unary_message(&framed).expect("own frame")).expect("re-decodes");
    assert_eq!(again, decoded);
    Some(decoded)
}

fn check_image(requested: &str, image: &Image) {
    let resolved = resolve(requested, image);
    for (i, name) in resolved.names.iter().enumerate() {
        assert!(!resolved.names[..i].contains(name));
    }
    assert_eq!(resolved.reference.is_some(), !resolved.names.is_empty());
    if let Some(reference) = &resolved.reference {
        assert!(resolved.names.iter().any(|n| n.name() == reference.name()));
        if let Some(digest) = manifest_digest(reference, image) {
            assert!(is_digest(&digest), "{digest}");
        }
        let _ = pulled_as(reference, &resolved.names);
    }
    // The image's own names refer to it, however they are spelled.
    for name in image.repo_tags.iter().chain(&image.repo_digests) {
        if ImageRef::parse(name).is_ok() {
            assert!(refers_to(name, "", image), "{name}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [kind, flags, rest @ ..] = data else {
        return;
    };
    let body = if flags & 1 != 0 {
        let mut framed = vec![0];
        framed.extend_from_slice(&u32::try_from(rest.len()).unwrap_or(u32::MAX).to_be_bytes());
        framed.extend_from_slice(rest);
        Bytes::from(framed)
    } else {
        Bytes::copy_from_slice(rest)
    };
    let message = match grpc::unary_message(&body) {
        Ok(message) => message,
        Err(FrameError::TooLarge { len, .. }) => return assert!(len > MAX_INSPECTED_MESSAGE),
        Err(_) => return,
    };
    assert_eq!((body[0], &body[5..]), (0, &message[..]));

    match kind % 6 {
        0 => {
            if let Some(request) = decode::<ImageStatusRequest>(&message) {
                let _ = request.image.map(|i| ImageRef::parse(&i.image));
            }
        }
        1 => {
            if let Some(request) = decode::<PullImageRequest>(&message) {
                let _ = request.image.map(|i| ImageRef::parse(&i.image));
            }
        }
        2 => {
            let Some(request) = decode::<CreateContainerRequest>(&message) else {
                return;
            };
            let Ok(uses) = image_uses(&request) else {
                return;
            };
            let config = request.config.expect("uses come from the config");
            let volumes = config.mounts.iter().filter(|m| m.image.is_some());
            assert_eq!(uses.len(), 1 + volumes.count());
            assert_eq!(Some(&uses[0].spec), config.image.as_ref());
            assert!(uses[0].mount.is_none());
            assert!(uses.iter().all(|u| !u.spec.image.is_empty()));
            assert!(uses[1..].iter().all(|u| u.mount.is_some()));
        }
        3 => {
            if let Some(image) = decode::<ImageStatusResponse>(&message).and_then(|r| r.image) {
                for requested in [image.id.as_str(), "app"]
                    .into_iter()
                    .chain(image.repo_tags.iter().map(String::as_str))
                {
                    check_image(requested, &image);
                }
            }
        }
        4 => {
            if let Some(answer) = decode::<PullImageResponse>(&message) {
                let _ = ImageRef::parse(&answer.image_ref);
            }
        }
        _ => {
            let _ = decode::<PodSandboxStatusResponse>(&message);
        }
    }

    // The request path, and the guard's own answers quoting what it read.
    let text = String::from_utf8_lossy(&message);
    if let Route::Refuse(words) = Route::of(&text) {
        // At most 100 characters of the path, each escaped to at most 10.
        assert!(words.len() < 1400, "{}", words.len());
    }
    let encoded = grpc::percent_encode(&text);
    assert!(encoded.bytes().all(|b| (0x20..0x7f).contains(&b)));
    let response = grpc::error_response(Code::PermissionDenied, &text);
    assert_eq!(response.headers()["grpc-message"], encoded.as_str());
});
