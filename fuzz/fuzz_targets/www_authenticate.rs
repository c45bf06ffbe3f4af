//! Fuzzes the `WWW-Authenticate` parser: it must never panic, must respect
//! its limits, and a parsed challenge rendered back must parse to itself.
#![no_main]

use credlet_imageguard::www_authenticate::{
    MAX_CHALLENGES, MAX_HEADER_LEN, MAX_PARAMS, parse, parse_bytes, summarize,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let from_bytes = parse_bytes(data);
    let Ok(text) = std::str::from_utf8(data) else {
        assert!(from_bytes.is_err());
        return;
    };
    let parsed = parse(text);
    assert_eq!(parsed, from_bytes);
    let Ok(challenges) = parsed else { return };
    assert!(text.len() <= MAX_HEADER_LEN);
    assert!(!challenges.is_empty() && challenges.len() <= MAX_CHALLENGES);
    let params: usize = challenges.iter().map(|c| c.params.len()).sum();
    assert!(params <= MAX_PARAMS);
    for c in &challenges {
        assert!(!c.scheme.is_empty());
        assert!(c.token68.is_none() || c.params.is_empty());
        for (name, _) in &c.params {
            assert_eq!(*name, name.to_ascii_lowercase());
            assert_eq!(
                c.param(name).map(str::len),
                c.param(&name.to_ascii_uppercase()).map(str::len)
            );
        }
        // Display re-quotes values; tabs are escaped for humans, so skip them.
        if !c.params.iter().any(|(_, v)| v.contains('\t')) {
            let again = parse(&c.to_string()).expect("rendered challenge parses");
            assert_eq!(again.len(), 1);
            assert_eq!(&again[0], c);
        }
    }
    for max in [0usize, 1, 3, 10, 300] {
        let s = summarize(&challenges, max);
        assert!(s.len() <= max.max(3), "{} > {max}", s.len());
    }
});
