//! credlet's issuance library.
//!
//! Used on the node to generate keys and certificate signing requests, and
//! inside every CA (`credlet ca`, its PodCertificateRequest signer and the
//! embedded development CA) to verify CSRs and sign leaf certificates for
//! pod identities.
//!
//! Design rules:
//!
//! - The identity in a certificate comes only from the [`PodIdentity`] given
//!   to [`Authority::issue`]. A CSR contributes its public key and nothing
//!   else, and only after its signature (the proof of possession) verifies.
//! - Private keys never appear in `Debug` output or error messages; their
//!   serialized forms live in buffers wiped on drop.
//! - Errors say which input was wrong and why.
//! - Names a pod asks for are [`Template`]s: one grammar on the node, in
//!   the CA service and in the PodCertificateRequest signer.
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use credlet_ca::*;
//!
//! let authority = Authority::generate_self_signed(Policy::new("cluster.local"))?;
//! let key = PrivateKey::generate(KeyType::EcdsaP256)?;
//! let request = IssuanceRequest {
//!     csr_der: key.certificate_signing_request()?,
//!     identity: PodIdentity {
//!         namespace: "default".into(),
//!         name: "web-0".into(),
//!         uid: "0b7d3c36-7ad9-4cf1-9f0c-3d5a7c1f2e10".into(),
//!         service_account: "web".into(),
//!     },
//!     spiffe_id: None,
//!     dns_names: vec!["web.default.svc".into()],
//!     ip_addresses: vec![],
//!     common_name: None,
//!     duration: Duration::from_secs(3600),
//! };
//! let issued = authority.issue(&request, SystemTime::now())?;
//! verify_chain(&issued.chain_pem, &issued.trust_bundle_pem, SystemTime::now())?;
//! assert!(key_matches_certificate(key.pem(), &issued.chain_pem)?);
//! let leaf = inspect_leaf(&issued.chain_pem)?;
//! assert_eq!(leaf.uris, ["spiffe://cluster.local/ns/default/sa/web"]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod authority;
mod csr;
mod error;
mod inspect;
mod key;
mod pem;
mod policy;
mod public_key;
mod template;

#[cfg(test)]
mod tests;

pub use authority::{Authority, IssuedCertificate};
pub use csr::VerifiedCsr;
pub use error::{
    CaError, CsrError, IssueError, KeyTypeError, PolicyError, PublicKeyError, TemplateError,
};
pub use inspect::{
    CertificateInfo, inspect_certificate, inspect_leaf, key_matches_certificate, verify_chain,
};
pub use key::{KeyType, PrivateKey};
pub use policy::{IssuanceRequest, PodIdentity, Policy, ca_spiffe_id};
pub use public_key::{
    MAX_KEY_MATERIAL_LEN, PublicKeyType, UnverifiedCsr, UnverifiedPublicKey, VerifiedPublicKey,
};
pub use template::{Template, TemplateVariable, TemplateVars, expand_template};
/// Re-exported: the wrapper [`Authority::generate_self_signed_with_pems`]
/// returns the CA key in.
pub use zeroize::Zeroizing;
