//! Fuzzes everything a NodePublishVolume caller controls before any disk
//! access: the volume context (credlet attributes, pod info, the token map),
//! template expansion, volume ids, target paths and file names.
//!
//! Input format: records separated by 0xFF; each record is `key 0xFE value`.
#![no_main]

use std::collections::HashMap;
use std::path::Path;

use credlet_csi::attributes::{
    VolumeAttributes, check_context_size, parse_pod_identity, parse_token,
};
use credlet_csi::paths::{TargetPath, VolumeId, check_file_name};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut context = HashMap::new();
    for record in data.split(|b| *b == 0xFF) {
        let mut parts = record.splitn(2, |b| *b == 0xFE);
        let key = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
        let value = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
        let _ = VolumeId::parse(&key);
        let _ = TargetPath::parse(&value, Path::new("/var/lib/kubelet"));
        let _ = check_file_name("fuzz", &value);
        context.insert(key, value);
    }
    if check_context_size(&context).is_err() {
        return;
    }
    let _ = parse_token(&context, "credlet");
    let pod = parse_pod_identity(&context);
    if let Ok(attributes) = VolumeAttributes::parse(&context) {
        if let Ok(pod) = pod {
            if let Ok(names) = attributes.expand(&pod, "cluster.local") {
                assert!(!names.spiffe_id.is_empty());
            }
        }
    }
});
