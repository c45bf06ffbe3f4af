//! Pull credentials as the kubelet hands them over in
//! `PullImageRequest.auth` (a CRI `AuthConfig`).
//!
//! Which field wins follows containerd's CRI plugin: a user name (with its
//! password) first, then an identity token, then the docker-config style
//! `auth` field; credlet additionally honours `registry_token` (a bearer
//! token for the registry itself), which containerd ignores. Secrets live in
//! [`Zeroizing`] buffers and never appear in `Debug` output or error
//! messages.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::GeneralPurpose;
use base64::engine::{DecodePaddingMode, GeneralPurposeConfig};
use zeroize::Zeroizing;

use credlet_proto::cri::AuthConfig;

/// Longest value accepted in any `AuthConfig` field (registry tokens and
/// cloud passwords are a few KiB; this bounds memory and header sizes).
pub const MAX_FIELD_LEN: usize = 16 * 1024;

/// Standard base64 alphabet, padding optional (docker writes it padded;
/// some tools drop it).
const AUTH_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why an `AuthConfig` could not be turned into a [`Credential`]. Messages
/// name the field and the problem, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// A field exceeds [`MAX_FIELD_LEN`].
    #[error("auth field {field} is {len} bytes long, more than the {max} allowed")]
    FieldTooLong {
        /// The `AuthConfig` field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// `auth` is not base64 (standard alphabet).
    #[error("auth field `auth` ({len} bytes) is not valid base64 of \"username:password\"")]
    AuthNotBase64 {
        /// Length of the encoded value.
        len: usize,
    },
    /// Decoded `auth` is not UTF-8.
    #[error("auth field `auth` does not decode to UTF-8 text")]
    AuthNotUtf8,
    /// Decoded `auth` has no `:` between user name and password.
    #[error("auth field `auth` does not decode to \"username:password\" (no ':')")]
    AuthMissingColon,
    /// A password came without a user name.
    #[error("a {field} was given without a username")]
    SecretWithoutUsername {
        /// Where the secret came from (`password`, decoded `auth`).
        field: &'static str,
    },
    /// The user name holds control characters.
    #[error("the username contains control characters")]
    InvalidUsername,
    /// A token holds characters that cannot go into an HTTP header.
    #[error("auth field {field} contains characters not allowed in an HTTP header token")]
    InvalidToken {
        /// The `AuthConfig` field.
        field: &'static str,
    },
}

/// What the credential proves identity with.
#[derive(Clone)]
pub(crate) enum Secret {
    /// User name and password (`username`/`password` or decoded `auth`):
    /// HTTP Basic, or the token endpoint's Basic-authenticated GET.
    Password {
        username: String,
        password: Zeroizing<String>,
    },
    /// An OAuth2 refresh token (`identity_token`), exchanged at the token
    /// endpoint with `grant_type=refresh_token`.
    IdentityToken {
        username: String,
        token: Zeroizing<String>,
    },
    /// A bearer token sent to the registry as is (`registry_token`).
    RegistryToken { token: Zeroizing<String> },
}

/// The kind of a [`Credential`], for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CredentialKind {
    /// User name and password.
    Password,
    /// OAuth2 refresh token (`identity_token`).
    IdentityToken,
    /// Registry bearer token (`registry_token`).
    RegistryToken,
}

impl CredentialKind {
    /// A short lowercase name (`password`, `identity_token`, `registry_token`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Password => "password",
            Self::IdentityToken => "identity_token",
            Self::RegistryToken => "registry_token",
        }
    }
}

/// A non-anonymous pull credential.
#[derive(Clone)]
pub struct Credential {
    secret: Secret,
    server_address: String,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("kind", &self.kind())
            .field("username", &self.username())
            .field("server_address", &self.server_address)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Rejects over-long fields.
fn check_len(field: &'static str, value: &str) -> Result<(), CredentialError> {
    if value.len() > MAX_FIELD_LEN {
        return Err(CredentialError::FieldTooLong {
            field,
            len: value.len(),
            max: MAX_FIELD_LEN,
        });
    }
    Ok(())
}

/// A user name must be printable (it is logged).
fn check_username(username: &str) -> Result<(), CredentialError> {
    if username.chars().any(char::is_control) {
        return Err(CredentialError::InvalidUsername);
    }
    Ok(())
}

/// Tokens go into `Authorization: Bearer <token>` or a form body: visible
/// ASCII only.
fn check_token(field: &'static str, token: &str) -> Result<(), CredentialError> {
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(CredentialError::InvalidToken { field });
    }
    Ok(())
}

impl Credential {
    /// Builds the credential from a CRI `AuthConfig`. `Ok(None)` means
    /// anonymous (every secret field empty).
    pub fn from_auth_config(auth: &AuthConfig) -> Result<Option<Credential>, CredentialError> {
        check_len("username", &auth.username)?;
        check_len("password", &auth.password)?;
        check_len("auth", &auth.auth)?;
        check_len("server_address", &auth.server_address)?;
        check_len("identity_token", &auth.identity_token)?;
        check_len("registry_token", &auth.registry_token)?;
        let server_address = auth.server_address.clone();
        let with = |secret| {
            Some(Credential {
                secret,
                server_address: server_address.clone(),
            })
        };

        if !auth.username.is_empty() {
            check_username(&auth.username)?;
            if auth.password.is_empty() && !auth.identity_token.is_empty() {
                // docker: a user name with an identity token (`<token>`).
                check_token("identity_token", &auth.identity_token)?;
                return Ok(with(Secret::IdentityToken {
                    username: auth.username.clone(),
                    token: Zeroizing::new(auth.identity_token.clone()),
                }));
            }
            return Ok(with(Secret::Password {
                username: auth.username.clone(),
                password: Zeroizing::new(auth.password.clone()),
            }));
        }
        if !auth.password.is_empty() {
            return Err(CredentialError::SecretWithoutUsername { field: "password" });
        }
        if !auth.identity_token.is_empty() {
            check_token("identity_token", &auth.identity_token)?;
            return Ok(with(Secret::IdentityToken {
                username: String::new(),
                token: Zeroizing::new(auth.identity_token.clone()),
            }));
        }
        if !auth.auth.is_empty() {
            let (username, password) = decode_auth(&auth.auth)?;
            return Ok(with(Secret::Password { username, password }));
        }
        if !auth.registry_token.is_empty() {
            check_token("registry_token", &auth.registry_token)?;
            return Ok(with(Secret::RegistryToken {
                token: Zeroizing::new(auth.registry_token.clone()),
            }));
        }
        Ok(None)
    }

    /// A username/password credential (tests, and callers that resolved a
    /// docker config themselves).
    pub fn basic(username: &str, password: &str) -> Result<Credential, CredentialError> {
        let auth = AuthConfig {
            username: username.to_string(),
            password: password.to_string(),
            ..AuthConfig::default()
        };
        Self::from_auth_config(&auth)?
            .ok_or(CredentialError::SecretWithoutUsername { field: "password" })
    }

    /// Which kind of secret this is.
    pub fn kind(&self) -> CredentialKind {
        match self.secret {
            Secret::Password { .. } => CredentialKind::Password,
            Secret::IdentityToken { .. } => CredentialKind::IdentityToken,
            Secret::RegistryToken { .. } => CredentialKind::RegistryToken,
        }
    }

    /// The user name, if the credential has one (safe to log).
    pub fn username(&self) -> Option<&str> {
        match &self.secret {
            Secret::Password { username, .. } | Secret::IdentityToken { username, .. }
                if !username.is_empty() =>
            {
                Some(username)
            }
            _ => None,
        }
    }

    /// `server_address` as the kubelet sent it (informational: the kubelet
    /// already matched the credential to the image's registry).
    pub fn server_address(&self) -> &str {
        &self.server_address
    }

    /// The secret, for the verifier.
    pub(crate) fn secret(&self) -> &Secret {
        &self.secret
    }

    /// A short description for messages: `user "alice"`, or the kind.
    pub fn describe(&self) -> String {
        match self.username() {
            Some(user) => format!("user {user:?}"),
            None => match self.kind() {
                CredentialKind::Password => "the password credential".to_string(),
                CredentialKind::IdentityToken => "the identity token".to_string(),
                CredentialKind::RegistryToken => "the registry token".to_string(),
            },
        }
    }

    /// An unambiguous encoding of the credential — a version tag, then the
    /// kind and each field, length-prefixed (u32 big-endian) — for the
    /// caller to HMAC under a node-local key. `server_address` is not part of
    /// it: it does not change what the registry checks. Never store or log
    /// these bytes.
    pub fn canonical_bytes(&self) -> Zeroizing<Vec<u8>> {
        let (kind, user, secret): (u8, &str, &str) = match &self.secret {
            Secret::Password { username, password } => (1, username, password),
            Secret::IdentityToken { username, token } => (2, username, token),
            Secret::RegistryToken { token } => (3, "", token),
        };
        const TAG: &[u8] = b"credlet-credential-v1";
        let mut out = Zeroizing::new(Vec::with_capacity(
            TAG.len() + 1 + 8 + user.len() + secret.len(),
        ));
        out.extend_from_slice(TAG);
        out.push(kind);
        for field in [user.as_bytes(), secret.as_bytes()] {
            // Fields are bounded by MAX_FIELD_LEN, so the length fits in u32.
            let len = u32::try_from(field.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(field);
        }
        out
    }
}

/// Decodes docker's `auth`: base64("username:password").
fn decode_auth(encoded: &str) -> Result<(String, Zeroizing<String>), CredentialError> {
    let trimmed = encoded.trim();
    let decoded = Zeroizing::new(
        AUTH_BASE64
            .decode(trimmed)
            .map_err(|_| CredentialError::AuthNotBase64 { len: encoded.len() })?,
    );
    let text = std::str::from_utf8(&decoded).map_err(|_| CredentialError::AuthNotUtf8)?;
    let (username, password) = text
        .split_once(':')
        .ok_or(CredentialError::AuthMissingColon)?;
    if username.is_empty() {
        return Err(CredentialError::SecretWithoutUsername {
            field: "decoded `auth`",
        });
    }
    check_username(username)?;
    Ok((username.to_string(), Zeroizing::new(password.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AuthConfig {
        AuthConfig::default()
    }

    fn b64(s: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn password_of(c: &Credential) -> String {
        match c.secret() {
            Secret::Password { password, .. } => password.to_string(),
            _ => panic!("not a password credential"),
        }
    }

    #[test]
    fn anonymous() {
        assert!(Credential::from_auth_config(&cfg()).unwrap().is_none());
        // server_address alone is still anonymous.
        let a = AuthConfig {
            server_address: "h.io".into(),
            ..cfg()
        };
        assert!(Credential::from_auth_config(&a).unwrap().is_none());
    }

    #[test]
    fn username_password() {
        let a = AuthConfig {
            username: "alice".into(),
            password: "s3cret".into(),
            server_address: "h.io".into(),
            auth: b64(b"bob:other"),
            ..cfg()
        };
        let c = Credential::from_auth_config(&a).unwrap().unwrap();
        assert_eq!(c.kind(), CredentialKind::Password);
        assert_eq!(c.username(), Some("alice"));
        assert_eq!(password_of(&c), "s3cret");
        assert_eq!(c.server_address(), "h.io");
        assert_eq!(c.describe(), "user \"alice\"");
        // A user with an empty password is still a password credential.
        let a = AuthConfig {
            username: "alice".into(),
            ..cfg()
        };
        let c = Credential::from_auth_config(&a).unwrap().unwrap();
        assert_eq!(password_of(&c), "");
        assert_eq!(Credential::basic("u", "p").unwrap().username(), Some("u"));
    }

    #[test]
    fn auth_field() {
        for (encoded, user, pass) in [
            (b64(b"alice:pw"), "alice", "pw"),
            (b64(b"alice:pw:with:colons"), "alice", "pw:with:colons"),
            (b64(b"alice:"), "alice", ""),
            (
                b64(b"al:ice").trim_end_matches('=').to_string(),
                "al",
                "ice",
            ),
            (format!(" {} ", b64(b"x:y")), "x", "y"),
        ] {
            let a = AuthConfig {
                auth: encoded.clone(),
                ..cfg()
            };
            let c = Credential::from_auth_config(&a).unwrap().unwrap();
            assert_eq!(c.username(), Some(user), "{encoded}");
            assert_eq!(password_of(&c), pass);
        }
    }

    #[test]
    fn auth_field_errors_never_contain_the_secret() {
        let cases = [
            (format!("{}!!", b64(b"hunter2:hunter2")), "not valid base64"),
            (b64(b"hunter2-hunter2"), "no ':'"),
            (b64(b":hunter2"), "without a username"),
            (b64(b"hunter2\xff\xfe:hunter2"), "UTF-8"),
            (b64(b"hun\nter2:hunter2"), "control"),
        ];
        for (encoded, want) in cases {
            let a = AuthConfig {
                auth: encoded.clone(),
                ..cfg()
            };
            let err = Credential::from_auth_config(&a).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
            for secret in ["hunter", "aHVu", &encoded] {
                assert!(!err.contains(secret), "{err} leaks {secret}");
            }
        }
    }

    #[test]
    fn tokens() {
        let a = AuthConfig {
            identity_token: "refresh-tok".into(),
            auth: b64(b"a:b"),
            registry_token: "reg".into(),
            ..cfg()
        };
        let c = Credential::from_auth_config(&a).unwrap().unwrap();
        assert_eq!(c.kind(), CredentialKind::IdentityToken);
        assert_eq!(c.username(), None);
        assert_eq!(c.describe(), "the identity token");

        let a = AuthConfig {
            username: "<token>".into(),
            identity_token: "refresh-tok".into(),
            ..cfg()
        };
        let c = Credential::from_auth_config(&a).unwrap().unwrap();
        assert_eq!(c.kind(), CredentialKind::IdentityToken);
        assert_eq!(c.username(), Some("<token>"));

        let a = AuthConfig {
            registry_token: "bearer-tok".into(),
            ..cfg()
        };
        let c = Credential::from_auth_config(&a).unwrap().unwrap();
        assert_eq!(c.kind(), CredentialKind::RegistryToken);
        assert_eq!(c.kind().as_str(), "registry_token");

        let a = AuthConfig {
            registry_token: "has space".into(),
            ..cfg()
        };
        let err = Credential::from_auth_config(&a).unwrap_err().to_string();
        assert!(
            err.contains("registry_token") && !err.contains("space"),
            "{err}"
        );
        let a = AuthConfig {
            identity_token: "bad\ntoken".into(),
            ..cfg()
        };
        assert!(matches!(
            Credential::from_auth_config(&a),
            Err(CredentialError::InvalidToken {
                field: "identity_token"
            })
        ));
    }

    #[test]
    fn malformed_combinations() {
        let a = AuthConfig {
            password: "pw".into(),
            ..cfg()
        };
        assert_eq!(
            Credential::from_auth_config(&a).unwrap_err(),
            CredentialError::SecretWithoutUsername { field: "password" }
        );
        let a = AuthConfig {
            username: "a\u{7}".into(),
            password: "pw".into(),
            ..cfg()
        };
        assert_eq!(
            Credential::from_auth_config(&a).unwrap_err(),
            CredentialError::InvalidUsername
        );
        let a = AuthConfig {
            password: "x".repeat(MAX_FIELD_LEN + 1),
            username: "u".into(),
            ..cfg()
        };
        assert!(matches!(
            Credential::from_auth_config(&a).unwrap_err(),
            CredentialError::FieldTooLong {
                field: "password",
                ..
            }
        ));
    }

    #[test]
    fn debug_is_redacted() {
        let a = AuthConfig {
            username: "alice".into(),
            password: "hunter2-secret".into(),
            ..cfg()
        };
        let c = Credential::from_auth_config(&a).unwrap().unwrap();
        let dbg = format!("{c:?}");
        assert!(dbg.contains("alice"), "{dbg}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        let a = AuthConfig {
            registry_token: "tok-secret".into(),
            ..cfg()
        };
        let dbg = format!("{:?}", Credential::from_auth_config(&a).unwrap().unwrap());
        assert!(!dbg.contains("tok-secret"), "{dbg}");
    }

    #[test]
    fn canonical_bytes_are_unambiguous() {
        let enc = |u: &str, p: &str| Credential::basic(u, p).unwrap().canonical_bytes().to_vec();
        // Moving bytes between fields changes the encoding.
        assert_ne!(enc("ab", "c"), enc("a", "bc"));
        assert_ne!(enc("a:b", "c"), enc("a", "b:c"));
        assert_eq!(enc("alice", "pw"), enc("alice", "pw"));
        // server_address does not matter; the kind does.
        let a = AuthConfig {
            username: "alice".into(),
            password: "pw".into(),
            server_address: "elsewhere".into(),
            ..cfg()
        };
        let c = Credential::from_auth_config(&a).unwrap().unwrap();
        assert_eq!(c.canonical_bytes().to_vec(), enc("alice", "pw"));
        let via_auth = AuthConfig {
            auth: b64(b"alice:pw"),
            ..cfg()
        };
        let c = Credential::from_auth_config(&via_auth).unwrap().unwrap();
        assert_eq!(c.canonical_bytes().to_vec(), enc("alice", "pw"));
        let tok = |f: fn(&mut AuthConfig)| {
            let mut a = cfg();
            f(&mut a);
            Credential::from_auth_config(&a)
                .unwrap()
                .unwrap()
                .canonical_bytes()
                .to_vec()
        };
        let id = tok(|a| a.identity_token = "pw".into());
        let reg = tok(|a| a.registry_token = "pw".into());
        assert_ne!(id, reg);
        let bytes = enc("alice", "pw");
        assert!(bytes.starts_with(b"credlet-credential-v1\x01\0\0\0\x05alice\0\0\0\x02pw"));
        assert_eq!(bytes.len(), 21 + 1 + 4 + 5 + 4 + 2);
    }
}
