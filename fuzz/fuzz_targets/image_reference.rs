//! Fuzzes image reference parsing and the allowlist: no panics, normalized
//! forms re-parse to themselves, and an image always matches allowlist
//! entries built from its own name.
//!
//! Input format: records separated by 0xFF; the first is the reference,
//! the rest are allowlist entries.
#![no_main]

use credlet_imageguard::reference::{Allowlist, ImageRef, MAX_NAME_LEN, is_digest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut records = data
        .split(|b| *b == 0xFF)
        .map(|r| String::from_utf8_lossy(r).into_owned());
    let reference = records.next().unwrap_or_default();
    let entries: Vec<String> = records.collect();
    let allowlist = Allowlist::parse(&entries);
    let _ = is_digest(&reference);

    let Ok(image) = ImageRef::parse(&reference) else {
        return;
    };
    let normalized = image.to_string();
    assert_eq!(
        ImageRef::parse(&normalized).expect("normalized parses"),
        image
    );
    let name = image.name();
    assert!(image.repository().len() <= MAX_NAME_LEN);
    let by_name = ImageRef::parse(&name).expect("name parses");
    assert_eq!(by_name.name(), name);
    assert_eq!((by_name.tag(), by_name.digest()), (None, None));
    if let Some(d) = image.digest() {
        assert!(is_digest(d));
    }
    if let Ok(list) = &allowlist {
        let _ = list.matches(&image);
    }

    let exact = Allowlist::parse([name.as_str()]).expect("own name is a valid entry");
    assert!(exact.matches(&image));
    let host = format!("{}/*", image.registry());
    let below_host = Allowlist::parse([host.as_str()]).expect("own host wildcard is valid");
    assert!(below_host.matches(&image));
    if let Some((first, _)) = image.repository().split_once('/') {
        let prefix = format!("{}/{first}/*", image.registry());
        let list = Allowlist::parse([prefix.as_str()]).expect("own prefix wildcard is valid");
        assert!(list.matches(&image));
        // A wildcard never matches the prefix itself.
        let parent = ImageRef::parse(&format!("{}/{first}", image.registry()));
        if let Ok(parent) = parent {
            if parent.name() == format!("{}/{first}", image.registry()) {
                assert!(!list.matches(&parent));
            }
        }
    }
});
