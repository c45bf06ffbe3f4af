//! Why an inspected CRI call failed, as one of a few reasons: what an
//! operator alerts on (`credlet_imageguard_failures_total{rpc,reason}`)
//! must not depend on the wording of a runtime's message. The message
//! itself goes to the call's log line.
//!
//! Decisions (a pod refused a cached image) are not failures: they are
//! counted as decisions. A failure is a call that could not be decided or
//! answered as asked: the runtime said no, could not be reached or answered
//! garbage, a deadline passed, or the request itself could not be used.

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

use crate::grpc::FrameError;
use crate::proxy::UpstreamError;

/// Why an inspected call failed.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// The runtime answered with a gRPC error; the caller gets it unchanged.
    RuntimeError,
    /// The runtime could not be reached, or broke off the call.
    RuntimeUnavailable,
    /// A deadline passed: the caller's, while credlet inspected the call,
    /// or credlet's own on a lookup of its own at the runtime.
    Timeout,
    /// The request is larger than the proxy inspects (the kubelet's CRI
    /// limit).
    Oversized,
    /// The request could not be read or decoded (a broken frame, a
    /// compressed message, invalid protobuf, a caller that went away).
    Undecodable,
    /// The request decoded but lacks what the call needs (no image, an
    /// invalid reference, malformed credentials, no sandbox config).
    InvalidRequest,
    /// The runtime's answer could not be read.
    MalformedAnswer,
}

impl Failure {
    /// Every reason, so the counter family shows each from the start.
    pub const ALL: [Self; 7] = [
        Self::RuntimeError,
        Self::RuntimeUnavailable,
        Self::Timeout,
        Self::Oversized,
        Self::Undecodable,
        Self::InvalidRequest,
        Self::MalformedAnswer,
    ];

    /// The metric label value and log field, in the words every credlet
    /// label uses (Kubernetes reasons, gRPC code names).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RuntimeError => "RuntimeError",
            Self::RuntimeUnavailable => "RuntimeUnavailable",
            Self::Timeout => "Timeout",
            Self::Oversized => "Oversized",
            Self::Undecodable => "Undecodable",
            Self::InvalidRequest => "InvalidRequest",
            Self::MalformedAnswer => "MalformedAnswer",
        }
    }

    /// A request body that did not frame as one message.
    pub fn of_frame(error: &FrameError) -> Self {
        match error {
            FrameError::TooLarge { .. } => Self::Oversized,
            FrameError::Truncated { .. }
            | FrameError::TrailingBytes { .. }
            | FrameError::Compressed => Self::Undecodable,
        }
    }

    /// A call to the runtime that did not succeed.
    pub fn of_upstream(error: &UpstreamError) -> Self {
        match error {
            UpstreamError::Connect { .. } | UpstreamError::Exchange { .. } => {
                Self::RuntimeUnavailable
            }
            UpstreamError::Timeout { .. } => Self::Timeout,
            UpstreamError::Status { .. } => Self::RuntimeError,
            UpstreamError::Malformed { .. } | UpstreamError::TooLarge { .. } => {
                Self::MalformedAnswer
            }
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for Failure {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

/// The name of a gRPC status code, for log lines (`5` → `NotFound`).
pub fn code_name(code: u32) -> &'static str {
    match code {
        0 => "OK",
        1 => "Cancelled",
        2 => "Unknown",
        3 => "InvalidArgument",
        4 => "DeadlineExceeded",
        5 => "NotFound",
        6 => "AlreadyExists",
        7 => "PermissionDenied",
        8 => "ResourceExhausted",
        9 => "FailedPrecondition",
        10 => "Aborted",
        11 => "OutOfRange",
        12 => "Unimplemented",
        13 => "Internal",
        14 => "Unavailable",
        15 => "DataLoss",
        16 => "Unauthenticated",
        _ => "unknown code",
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;

    #[test]
    fn frame_errors() {
        let table = [
            (
                FrameError::TooLarge {
                    len: 17 << 20,
                    max: 16 << 20,
                },
                Failure::Oversized,
            ),
            (
                FrameError::Truncated {
                    len: 3,
                    expected: 5,
                },
                Failure::Undecodable,
            ),
            (FrameError::TrailingBytes { extra: 1 }, Failure::Undecodable),
            (FrameError::Compressed, Failure::Undecodable),
        ];
        for (error, want) in table {
            assert_eq!(Failure::of_frame(&error), want, "{error}");
        }
    }

    #[test]
    fn runtime_errors() {
        let socket = || PathBuf::from("/run/containerd/containerd.sock");
        let table = [
            (
                UpstreamError::Connect {
                    socket: socket(),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                },
                Failure::RuntimeUnavailable,
            ),
            (
                UpstreamError::Exchange {
                    socket: socket(),
                    source: "connection reset".into(),
                },
                Failure::RuntimeUnavailable,
            ),
            (
                UpstreamError::Timeout {
                    socket: socket(),
                    after: Duration::from_secs(30),
                },
                Failure::Timeout,
            ),
            (
                UpstreamError::Status {
                    path: "/runtime.v1.ImageService/ImageStatus",
                    status: 2,
                    message: "boom".into(),
                },
                Failure::RuntimeError,
            ),
            (
                UpstreamError::Malformed {
                    path: "/runtime.v1.ImageService/ImageStatus",
                    reason: "invalid wire type".into(),
                },
                Failure::MalformedAnswer,
            ),
            (
                UpstreamError::TooLarge {
                    socket: socket(),
                    max: 16 << 20,
                },
                Failure::MalformedAnswer,
            ),
        ];
        for (error, want) in table {
            assert_eq!(Failure::of_upstream(&error), want, "{error}");
        }
    }

    #[test]
    fn label_values_are_words_and_distinct() {
        let mut seen = std::collections::HashSet::new();
        for failure in Failure::ALL {
            let label = failure.as_str();
            assert!(
                label.starts_with(|c: char| c.is_ascii_uppercase())
                    && label.bytes().all(|b| b.is_ascii_alphabetic()),
                "{label}"
            );
            assert!(seen.insert(label), "{label} twice");
        }
    }

    #[test]
    fn status_code_names() {
        assert_eq!(code_name(5), "NotFound");
        assert_eq!(code_name(2), "Unknown");
        assert_eq!(code_name(99), "unknown code");
    }
}
