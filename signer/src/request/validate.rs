//! The checks behind [`super::validate`].

use std::time::Duration;

use credlet_ca::{
    PublicKeyError, PublicKeyType, UnverifiedCsr, UnverifiedPublicKey, VerifiedPublicKey,
};
use k8s_openapi::ByteString;

use super::{
    AcceptedKeyTypes, DEFAULT_MAX_EXPIRATION, Denial, DenialReason, MAX_KEY_MATERIAL_LEN,
    MAX_MAX_EXPIRATION, MIN_MAX_EXPIRATION, PodCertificateRequest, RequestShape, ValidatedRequest,
    annotations,
};

/// Longest UID accepted.
const MAX_UID_LEN: usize = 128;
/// Longest signer name (a qualified name: 253 + '/' + 317).
const MAX_SIGNER_NAME_LEN: usize = 571;

fn invalid(message: String) -> Denial {
    Denial::new(DenialReason::InvalidRequest, message)
}

pub(super) fn validate(
    request: &PodCertificateRequest,
    accepted: &AcceptedKeyTypes,
) -> Result<ValidatedRequest, Denial> {
    let meta = &request.metadata;
    let spec = &request.spec;
    let namespace = required("metadata.namespace", meta.namespace.as_deref(), is_label)?;
    let name = required("metadata.name", meta.name.as_deref(), is_subdomain)?;
    let signer_name = required("spec.signerName", Some(&spec.signer_name), |s| {
        s.len() <= MAX_SIGNER_NAME_LEN && s.contains('/') && s.bytes().all(|b| b.is_ascii_graphic())
    })?;
    let pod_name = required("spec.podName", Some(&spec.pod_name), is_subdomain)?;
    let pod_uid = required("spec.podUID", Some(&spec.pod_uid), is_uid)?;
    let service_account_name = required(
        "spec.serviceAccountName",
        Some(&spec.service_account_name),
        is_subdomain,
    )?;
    let service_account_uid = required(
        "spec.serviceAccountUID",
        Some(&spec.service_account_uid),
        is_uid,
    )?;
    let node_name = required("spec.nodeName", Some(&spec.node_name), is_subdomain)?;
    let node_uid = required("spec.nodeUID", Some(&spec.node_uid), is_uid)?;
    let max_expiration = max_expiration(spec.max_expiration_seconds)?;

    let pkix = present("spec.pkixPublicKey", spec.pkix_public_key.as_ref())?;
    let proof = present("spec.proofOfPossession", spec.proof_of_possession.as_ref())?;
    let stub = present("spec.stubPKCS10Request", spec.stub_pkcs10_request.as_ref())?;

    let options = annotations::parse(spec.unverified_user_annotations.as_ref())?;

    let shape_error = |message: &str| Denial::new(DenialReason::InvalidKeyMaterial, message);
    let (public_key, shape) = match (pkix, proof, stub) {
        (None, None, Some(csr)) => (stub_csr(csr, accepted)?, RequestShape::StubCsr),
        (Some(key), Some(proof), None) => (
            key_and_proof(key, proof, pod_uid, accepted)?,
            RequestShape::PublicKeyAndProof,
        ),
        (None, None, None) => {
            return Err(shape_error(
                "the request carries no key: set spec.stubPKCS10Request (or, before Kubernetes 1.36, spec.pkixPublicKey with spec.proofOfPossession)",
            ));
        }
        (_, _, Some(_)) => {
            return Err(shape_error(
                "the request carries both spec.stubPKCS10Request and spec.pkixPublicKey/spec.proofOfPossession; set only spec.stubPKCS10Request",
            ));
        }
        (Some(_), None, None) => {
            return Err(shape_error(
                "spec.pkixPublicKey is set without spec.proofOfPossession",
            ));
        }
        (None, Some(_), None) => {
            return Err(shape_error(
                "spec.proofOfPossession is set without spec.pkixPublicKey",
            ));
        }
    };

    Ok(ValidatedRequest {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        uid: meta.uid.clone(),
        signer_name: signer_name.to_owned(),
        pod_name: pod_name.to_owned(),
        pod_uid: pod_uid.to_owned(),
        service_account_name: service_account_name.to_owned(),
        service_account_uid: service_account_uid.to_owned(),
        node_name: node_name.to_owned(),
        node_uid: node_uid.to_owned(),
        public_key,
        shape,
        max_expiration,
        options,
    })
}

fn required<'a>(
    field: &str,
    value: Option<&'a str>,
    well_formed: impl Fn(&str) -> bool,
) -> Result<&'a str, Denial> {
    match value {
        None | Some("") => Err(invalid(format!("{field} is missing"))),
        Some(v) if !well_formed(v) => Err(invalid(format!(
            "{field} {:?} is not well formed",
            v.chars().take(64).collect::<String>()
        ))),
        Some(v) => Ok(v),
    }
}

/// A key material field when it is set and not empty, capped in size.
fn present<'a>(field: &str, value: Option<&'a ByteString>) -> Result<Option<&'a [u8]>, Denial> {
    match value {
        Some(bytes) if !bytes.0.is_empty() => {
            if bytes.0.len() > MAX_KEY_MATERIAL_LEN {
                return Err(invalid(format!(
                    "{field} is {} bytes, more than the limit of {MAX_KEY_MATERIAL_LEN}",
                    bytes.0.len()
                )));
            }
            Ok(Some(&bytes.0))
        }
        _ => Ok(None),
    }
}

fn max_expiration(seconds: Option<i32>) -> Result<Duration, Denial> {
    let Some(seconds) = seconds else {
        return Ok(DEFAULT_MAX_EXPIRATION);
    };
    let requested = u64::try_from(seconds)
        .map(Duration::from_secs)
        .unwrap_or(Duration::ZERO);
    if requested < MIN_MAX_EXPIRATION {
        return Err(invalid(format!(
            "spec.maxExpirationSeconds {seconds} is below the minimum of {}; certificates live at least an hour",
            MIN_MAX_EXPIRATION.as_secs()
        )));
    }
    Ok(requested.min(MAX_MAX_EXPIRATION))
}

fn key_and_proof(
    spki: &[u8],
    proof: &[u8],
    pod_uid: &str,
    accepted: &AcceptedKeyTypes,
) -> Result<VerifiedPublicKey, Denial> {
    let key = UnverifiedPublicKey::from_spki_der(spki)
        .map_err(|e| key_denial(e, "spec.pkixPublicKey", accepted))?;
    check_accepted(key.key_type(), accepted)?;
    key.verify_proof(pod_uid.as_bytes(), proof).map_err(|e| match e {
        PublicKeyError::BadSignature { key_type, .. } => Denial::new(
            DenialReason::InvalidProofOfPossession,
            format!(
                "spec.proofOfPossession does not verify with the {key_type} key in spec.pkixPublicKey as a signature over spec.podUID {pod_uid:?}; the requester must sign this pod's UID with the key's own private key"
            ),
        ),
        other => key_denial(other, "spec.proofOfPossession", accepted),
    })
}

fn stub_csr(der: &[u8], accepted: &AcceptedKeyTypes) -> Result<VerifiedPublicKey, Denial> {
    let field = "spec.stubPKCS10Request";
    let csr = UnverifiedCsr::from_der(der).map_err(|e| key_denial(e, field, accepted))?;
    check_accepted(csr.key_type(), accepted)?;
    csr.verify().map_err(|e| match e {
        PublicKeyError::BadSignature { key_type, .. } => Denial::new(
            DenialReason::InvalidProofOfPossession,
            format!(
                "the signature of {field} does not verify with its own {key_type} public key; the request must be signed with the key it names"
            ),
        ),
        other => key_denial(other, field, accepted),
    })
}

fn accepted_list(accepted: &AcceptedKeyTypes) -> String {
    accepted
        .types()
        .iter()
        .map(PublicKeyType::name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_accepted(key_type: PublicKeyType, accepted: &AcceptedKeyTypes) -> Result<(), Denial> {
    if accepted.accepts(key_type) {
        return Ok(());
    }
    Err(Denial::new(
        DenialReason::UnsupportedKeyType,
        format!(
            "this signer does not issue for {key_type} keys; use {} (accepted: {})",
            accepted.suggested(),
            accepted_list(accepted)
        ),
    ))
}

fn key_denial(error: PublicKeyError, field: &str, accepted: &AcceptedKeyTypes) -> Denial {
    match error {
        PublicKeyError::UnsupportedKeyType { found } => Denial::new(
            DenialReason::UnsupportedKeyType,
            format!(
                "{field} holds {found}; use {} (accepted: {})",
                accepted.suggested(),
                accepted_list(accepted)
            ),
        ),
        // Trailing bytes after an otherwise good key are no key credlet
        // can name either.
        PublicKeyError::Malformed {
            what: "public key",
            reason,
        } => Denial::new(
            DenialReason::UnsupportedKeyType,
            format!(
                "{field} is not a DER SubjectPublicKeyInfo ({reason}); use {}",
                accepted.suggested()
            ),
        ),
        PublicKeyError::UnsupportedSignatureAlgorithm { .. }
        | PublicKeyError::BadSignature { .. } => Denial::new(
            DenialReason::InvalidProofOfPossession,
            format!("{field}: {error}"),
        ),
        other => invalid(format!("{field}: {other}")),
    }
}

/// An RFC 1123 label: what namespaces are.
fn is_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// An RFC 1123 subdomain: what pod, service account, node and object names
/// are.
fn is_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_label)
}

/// What Kubernetes UIDs look like (UUIDs): letters, digits and `-`.
fn is_uid(s: &str) -> bool {
    s.len() <= MAX_UID_LEN && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}
