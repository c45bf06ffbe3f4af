//! A parser for `WWW-Authenticate` header values (RFC 7235 §4.1):
//!
//! ```text
//! WWW-Authenticate = 1#challenge
//! challenge   = auth-scheme [ 1*SP ( token68 / #auth-param ) ]
//! auth-param  = token BWS "=" BWS ( token / quoted-string )
//! token68     = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
//! ```
//!
//! Several challenges may share one header, separated by commas, e.g.
//! `Basic realm="r", Bearer realm="https://auth/token",service="reg"`. The
//! parser is total (it returns an error instead of panicking on any input)
//! and bounded: at most [`MAX_HEADER_LEN`] bytes, [`MAX_PARAMS`] auth-params
//! and [`MAX_CHALLENGES`] challenges. Parameter names are case-insensitive
//! and stored lowercase; a name repeated within one challenge is an error
//! (RFC 7235: each parameter name MUST occur only once per challenge).

use std::fmt;

/// Longest header value accepted.
pub const MAX_HEADER_LEN: usize = 8 * 1024;
/// Most auth-params accepted over all challenges of one header.
pub const MAX_PARAMS: usize = 16;
/// Most challenges accepted in one header.
pub const MAX_CHALLENGES: usize = 8;

/// Why a header value could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChallengeError {
    /// The header holds no challenge.
    #[error("empty WWW-Authenticate header")]
    Empty,
    /// The value is longer than [`MAX_HEADER_LEN`].
    #[error("WWW-Authenticate header is {len} bytes long, more than the {max} allowed")]
    TooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// More than [`MAX_PARAMS`] parameters or [`MAX_CHALLENGES`] challenges.
    #[error("WWW-Authenticate header has more than {max} {what}")]
    TooMany {
        /// `auth-params` or `challenges`.
        what: &'static str,
        /// The limit.
        max: usize,
    },
    /// The value is not UTF-8 (only [`parse_bytes`]).
    #[error("WWW-Authenticate header is not UTF-8")]
    NotUtf8,
    /// A syntax error at a byte offset.
    #[error("malformed WWW-Authenticate header at byte {offset}: {reason}")]
    Syntax {
        /// Byte offset of the problem.
        offset: usize,
        /// What was expected.
        reason: &'static str,
    },
    /// A parameter occurs twice in one challenge.
    #[error("WWW-Authenticate parameter {name:?} occurs twice in one challenge")]
    DuplicateParam {
        /// The (lowercased) parameter name.
        name: String,
    },
}

/// One challenge: a scheme with either a token68 or auth-params.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Challenge {
    /// The auth scheme as sent (`Basic`, `Bearer`, …); compare with
    /// [`Challenge::is_scheme`].
    pub scheme: String,
    /// The token68 form, if the challenge used it instead of parameters.
    pub token68: Option<String>,
    /// Parameters in order, names lowercased, quoted values unescaped.
    pub params: Vec<(String, String)>,
}

impl Challenge {
    /// Whether the scheme is `scheme` (case-insensitive).
    pub fn is_scheme(&self, scheme: &str) -> bool {
        self.scheme.eq_ignore_ascii_case(scheme)
    }

    /// Whether this is a `Basic` challenge.
    pub fn is_basic(&self) -> bool {
        self.is_scheme("basic")
    }

    /// Whether this is a `Bearer` challenge.
    pub fn is_bearer(&self) -> bool {
        self.is_scheme("bearer")
    }

    /// A parameter's value by (case-insensitive) name.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `realm` parameter.
    pub fn realm(&self) -> Option<&str> {
        self.param("realm")
    }
}

impl fmt::Display for Challenge {
    /// A normalized, printable rendering (`Bearer realm="…", service="…"`);
    /// control characters in values are escaped, so registry-provided text
    /// cannot forge log lines.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.scheme)?;
        if let Some(t) = &self.token68 {
            write!(f, " {t}")?;
        }
        for (i, (name, value)) in self.params.iter().enumerate() {
            f.write_str(if i == 0 { " " } else { ", " })?;
            write!(f, "{name}=\"")?;
            for c in value.chars() {
                match c {
                    '"' | '\\' => write!(f, "\\{c}")?,
                    c if c.is_control() => write!(f, "{}", c.escape_default())?,
                    c => write!(f, "{c}")?,
                }
            }
            f.write_str("\"")?;
        }
        Ok(())
    }
}

/// Parses a header value given as bytes (as `http::HeaderValue` holds it).
pub fn parse_bytes(value: &[u8]) -> Result<Vec<Challenge>, ChallengeError> {
    if value.len() > MAX_HEADER_LEN {
        return Err(ChallengeError::TooLong {
            len: value.len(),
            max: MAX_HEADER_LEN,
        });
    }
    parse(std::str::from_utf8(value).map_err(|_| ChallengeError::NotUtf8)?)
}

/// Parses a header value into its challenges (at least one).
pub fn parse(value: &str) -> Result<Vec<Challenge>, ChallengeError> {
    if value.len() > MAX_HEADER_LEN {
        return Err(ChallengeError::TooLong {
            len: value.len(),
            max: MAX_HEADER_LEN,
        });
    }
    let mut p = Parser {
        s: value.as_bytes(),
        pos: 0,
        params: 0,
    };
    let mut challenges = Vec::new();
    loop {
        p.skip_list_separators();
        if p.at_end() {
            break;
        }
        if challenges.len() == MAX_CHALLENGES {
            return Err(ChallengeError::TooMany {
                what: "challenges",
                max: MAX_CHALLENGES,
            });
        }
        challenges.push(p.challenge()?);
    }
    if challenges.is_empty() {
        return Err(ChallengeError::Empty);
    }
    Ok(challenges)
}

/// A one-line summary of challenges for messages (`Bearer realm="…",
/// service="…", scope="…", error="insufficient_scope"`), at most `max`
/// bytes.
pub fn summarize(challenges: &[Challenge], max: usize) -> String {
    let mut out = String::new();
    for (i, c) in challenges.iter().enumerate() {
        if i > 0 {
            out.push_str("; ");
        }
        out.push_str(&c.to_string());
    }
    truncate(&mut out, max);
    out
}

/// Cuts `s` to at most `max` bytes at a char boundary, marking the cut.
fn truncate(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push('…');
}

/// RFC 7230 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// RFC 7235 token68 characters (without the trailing `=`).
fn is_token68_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~+/".contains(&b)
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    params: usize,
}

impl<'a> Parser<'a> {
    fn at_end(&self) -> bool {
        self.pos >= self.s.len()
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn err(&self, reason: &'static str) -> ChallengeError {
        ChallengeError::Syntax {
            offset: self.pos,
            reason,
        }
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    /// Skips OWS and empty list elements (`, ,`).
    fn skip_list_separators(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b',')) {
            self.pos += 1;
        }
    }

    fn token(&mut self) -> Option<&'a str> {
        let s = self.s;
        let start = self.pos;
        while self.peek().is_some_and(is_tchar) {
            self.pos += 1;
        }
        if self.pos == start {
            return None;
        }
        // tchars are ASCII, so this slice is on char boundaries.
        std::str::from_utf8(s.get(start..self.pos)?).ok()
    }

    fn challenge(&mut self) -> Result<Challenge, ChallengeError> {
        let scheme = self
            .token()
            .ok_or_else(|| self.err("expected an auth scheme"))?
            .to_string();
        let mut challenge = Challenge {
            scheme,
            ..Challenge::default()
        };
        if self.at_end() || self.peek() == Some(b',') {
            return Ok(challenge);
        }
        if self.peek() != Some(b' ') {
            return Err(self.err("expected a space after the auth scheme"));
        }
        self.skip_ows();
        if self.at_end() || self.peek() == Some(b',') {
            return Ok(challenge);
        }
        // token68 or the first auth-param?
        let start = self.pos;
        if let Some(param) = self.try_param()? {
            self.push_param(&mut challenge, param)?;
        } else {
            self.pos = start;
            challenge.token68 = Some(self.token68()?);
            return Ok(challenge);
        }
        // More auth-params of this challenge, until a new scheme or the end.
        loop {
            self.skip_ows();
            if self.at_end() {
                return Ok(challenge);
            }
            if self.peek() != Some(b',') {
                return Err(self.err("expected ',' between parameters"));
            }
            self.skip_list_separators();
            if self.at_end() {
                return Ok(challenge);
            }
            let start = self.pos;
            match self.try_param()? {
                Some(param) => self.push_param(&mut challenge, param)?,
                None => {
                    // Not `name=`: the next challenge's scheme.
                    self.pos = start;
                    return Ok(challenge);
                }
            }
        }
    }

    fn push_param(
        &mut self,
        challenge: &mut Challenge,
        (name, value): (String, String),
    ) -> Result<(), ChallengeError> {
        if challenge.params.iter().any(|(n, _)| *n == name) {
            return Err(ChallengeError::DuplicateParam { name });
        }
        self.params += 1;
        if self.params > MAX_PARAMS {
            return Err(ChallengeError::TooMany {
                what: "auth-params",
                max: MAX_PARAMS,
            });
        }
        challenge.params.push((name, value));
        Ok(())
    }

    /// `token BWS "=" BWS (token / quoted-string)`. `Ok(None)` (position
    /// unspecified) when the input here is not `token BWS "="`, or when it is
    /// a token68 ending in `=` (followed by OWS and `,` or the end).
    fn try_param(&mut self) -> Result<Option<(String, String)>, ChallengeError> {
        let Some(name) = self.token().map(str::to_ascii_lowercase) else {
            return Ok(None);
        };
        self.skip_ows();
        if self.peek() != Some(b'=') {
            return Ok(None);
        }
        self.pos += 1;
        self.skip_ows();
        match self.peek() {
            Some(b'"') => Ok(Some((name, self.quoted_string()?))),
            Some(b) if is_tchar(b) => {
                let value = self.token().unwrap_or_default().to_string();
                Ok(Some((name, value)))
            }
            // `abc=` / `abc==` at the end of a list element: a token68.
            None | Some(b',' | b'=') => Ok(None),
            Some(_) => Err(self.err("expected a token or quoted-string value")),
        }
    }

    fn token68(&mut self) -> Result<String, ChallengeError> {
        let start = self.pos;
        while self.peek().is_some_and(is_token68_char) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.err("expected auth-params or a token68"));
        }
        while self.peek() == Some(b'=') {
            self.pos += 1;
        }
        let value = self
            .s
            .get(start..self.pos)
            .and_then(|b| std::str::from_utf8(b).ok())
            .ok_or_else(|| self.err("invalid token68"))?
            .to_string();
        self.skip_ows();
        if !(self.at_end() || self.peek() == Some(b',')) {
            return Err(self.err("unexpected characters after a token68"));
        }
        Ok(value)
    }

    /// `DQUOTE *( qdtext / quoted-pair ) DQUOTE`, unescaped.
    fn quoted_string(&mut self) -> Result<String, ChallengeError> {
        // Caller saw the opening quote.
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            let Some(b) = self.peek() else {
                return Err(self.err("unterminated quoted-string"));
            };
            match b {
                b'"' => {
                    self.pos += 1;
                    break;
                }
                b'\\' => {
                    self.pos += 1;
                    match self.peek() {
                        Some(c) if c == b'\t' || c == b' ' || c.is_ascii_graphic() || c >= 0x80 => {
                            out.push(c);
                            self.pos += 1;
                        }
                        _ => return Err(self.err("invalid quoted-pair")),
                    }
                }
                b'\t' | b' ' => {
                    out.push(b);
                    self.pos += 1;
                }
                b if b.is_ascii_graphic() || b >= 0x80 => {
                    out.push(b);
                    self.pos += 1;
                }
                _ => return Err(self.err("control character in quoted-string")),
            }
        }
        // Only ASCII backslashes were removed from valid UTF-8, so this
        // cannot fail; map it anyway instead of unwrapping.
        String::from_utf8(out).map_err(|_| self.err("invalid UTF-8 in quoted-string"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(s: &str) -> Challenge {
        let mut v = parse(s).unwrap();
        assert_eq!(v.len(), 1, "{v:?}");
        v.remove(0)
    }

    #[test]
    fn basic() {
        let c = one(r#"Basic realm="credlet-test-registry""#);
        assert!(c.is_basic());
        assert!(!c.is_bearer());
        assert_eq!(c.realm(), Some("credlet-test-registry"));
        assert_eq!(c.token68, None);
        let c = one("basic realm=simple");
        assert!(c.is_basic());
        assert_eq!(c.realm(), Some("simple"));
        let c = one("Basic");
        assert!(c.params.is_empty());
    }

    #[test]
    fn bearer_distribution() {
        let c = one(
            r#"Bearer realm="https://127.0.0.1:5001/token",service="credlet-test-registry",scope="repository:team/app:pull",error="insufficient_scope""#,
        );
        assert!(c.is_bearer());
        assert_eq!(c.realm(), Some("https://127.0.0.1:5001/token"));
        assert_eq!(c.param("service"), Some("credlet-test-registry"));
        assert_eq!(c.param("SCOPE"), Some("repository:team/app:pull"));
        assert_eq!(c.param("error"), Some("insufficient_scope"));
        assert_eq!(c.params.len(), 4);
        assert_eq!(
            c.to_string(),
            r#"Bearer realm="https://127.0.0.1:5001/token", service="credlet-test-registry", scope="repository:team/app:pull", error="insufficient_scope""#
        );
    }

    #[test]
    fn whitespace_case_and_escapes() {
        let c = one("  BEARER   Realm = \"a\\\"b\\\\c\" ,  Service=x  ");
        assert_eq!(c.scheme, "BEARER");
        assert!(c.is_bearer());
        assert_eq!(c.params[0], ("realm".to_string(), "a\"b\\c".to_string()));
        assert_eq!(c.param("service"), Some("x"));
        let c = one("Bearer realm=\"ünïcode\tok\"");
        assert_eq!(c.realm(), Some("ünïcode\tok"));
        let c = one(r#"Bearer realm="""#);
        assert_eq!(c.realm(), Some(""));
    }

    #[test]
    fn multiple_challenges() {
        let v = parse(
            r#"Newauth realm="apps", type=1, title="Login to \"apps\"", Basic realm="simple""#,
        )
        .unwrap();
        assert_eq!(v.len(), 2);
        assert!(v[0].is_scheme("newauth"));
        assert_eq!(v[0].param("type"), Some("1"));
        assert_eq!(v[0].param("title"), Some("Login to \"apps\""));
        assert!(v[1].is_basic());
        assert_eq!(v[1].realm(), Some("simple"));

        let v = parse("Negotiate, Basic realm=x,, ,Bearer").unwrap();
        let schemes: Vec<_> = v.iter().map(|c| c.scheme.as_str()).collect();
        assert_eq!(schemes, ["Negotiate", "Basic", "Bearer"]);

        let v = parse("Negotiate abc123==, Basic realm=x").unwrap();
        assert_eq!(v[0].token68.as_deref(), Some("abc123=="));
        assert!(v[1].is_basic());
        let v = parse("Negotiate a/b+c=").unwrap();
        assert_eq!(v[0].token68.as_deref(), Some("a/b+c="));
        let v = parse("Negotiate abc").unwrap();
        assert_eq!(v[0].token68.as_deref(), Some("abc"));
        assert!(v[0].params.is_empty());
    }

    #[test]
    fn summary() {
        let v = parse(r#"Basic realm="a", Bearer realm="b\"",error="x""#).unwrap();
        assert_eq!(
            summarize(&v, 200),
            r#"Basic realm="a"; Bearer realm="b\"", error="x""#
        );
        let s = summarize(&v, 10);
        assert!(s.len() <= 10 && s.ends_with('…'), "{s}");
    }

    #[test]
    fn malformed() {
        let long = format!("Basic realm=\"{}\"", "a".repeat(MAX_HEADER_LEN));
        let many_params: String = (0..=MAX_PARAMS)
            .map(|i| format!("p{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        let many_params = format!("Bearer {many_params}");
        let many_challenges = ["Basic"; MAX_CHALLENGES + 1].join(", ");
        for (input, want) in [
            ("", "empty"),
            ("   ,  , ", "empty"),
            (long.as_str(), "more than"),
            (many_params.as_str(), "more than 16 auth-params"),
            (many_challenges.as_str(), "more than 8 challenges"),
            ("=realm", "auth scheme"),
            ("\"Basic\"", "auth scheme"),
            ("Basic\trealm=x", "space after"),
            ("Basic realm=\"x", "unterminated"),
            ("Basic realm=\"x\\", "quoted-pair"),
            ("Basic realm=\"x\ny\"", "control"),
            ("Basic realm=x y", "','"),
            ("Basic realm=x realm=y", "','"),
            ("Basic realm=x, realm=y", "twice"),
            ("Basic Realm=x, REALM=y", "twice"),
            ("Basic realm=@", "value"),
            ("Basic realm=\"a\"b", "','"),
            ("Negotiate abc def", "after a token68"),
            ("Negotiate @@", "token68"),
            ("Basic realm=\"\u{7}\"", "control"),
        ] {
            let err = parse(input).expect_err(input).to_string();
            assert!(err.contains(want), "{input:?}: {err:?} lacks {want:?}");
        }
        assert_eq!(
            parse_bytes(b"Basic realm=\"\xff\""),
            Err(ChallengeError::NotUtf8)
        );
        assert!(parse_bytes(b"Basic realm=x").is_ok());
        assert!(matches!(
            parse_bytes(&vec![b'a'; MAX_HEADER_LEN + 1]),
            Err(ChallengeError::TooLong { .. })
        ));
        // Exactly at the limits is fine.
        let ok_params: String = (0..MAX_PARAMS)
            .map(|i| format!("p{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(
            parse(&format!("Bearer {ok_params}")).unwrap()[0]
                .params
                .len(),
            16
        );
    }

    #[test]
    fn never_panics_on_prefixes() {
        // Every prefix of valid and tricky inputs parses or errors cleanly.
        for s in [
            r#"Bearer realm="https://a/token",service="r\"x",scope="repository:a:pull", Basic realm=y"#,
            "Negotiate abc==, Basic realm=\"ü\\ü\"",
        ] {
            for (i, _) in s.char_indices() {
                let _ = parse(&s[..i]);
            }
            for i in 0..s.len() {
                let _ = parse_bytes(&s.as_bytes()[..i]);
            }
        }
    }
}
