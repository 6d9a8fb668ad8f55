//! Gitaly's v2 shared-secret token, wire-compatible with what gitlab-shell, Workhorse
//! and Rails send: the gRPC metadata `authorization: Bearer v2.<sig>.<ts>`, where `ts`
//! is the issue time in unix seconds as a decimal string and `sig` is the lower-case
//! hex HMAC-SHA256 of `ts` under the shared secret. A token is accepted within
//! [`VALIDITY`] of the checker's clock, either way.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How far a token's time may be from the checker's clock, before or after (Gitaly's
/// value).
pub const VALIDITY: Duration = Duration::from_secs(30);

/// The metadata key carrying the token (an HTTP/2 header, lower case).
pub const METADATA_KEY: &str = "authorization";

/// The shared secret. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// `None` for an empty secret: an empty secret would authenticate anyone who
    /// knows the scheme.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Option<Secret> {
        let bytes = bytes.into();
        (!bytes.is_empty()).then_some(Secret(bytes))
    }

    fn mac(&self, message: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(message.as_bytes());
        mac
    }

    /// The token for `at`: `v2.<hex hmac>.<unix seconds>`.
    pub fn token(&self, at: SystemTime) -> String {
        let ts = unix_seconds(at).to_string();
        let sig = hex::encode(self.mac(&ts).finalize().into_bytes());
        format!("v2.{sig}.{ts}")
    }

    /// Whether `candidate` is the secret itself, compared in constant time (through
    /// an HMAC of each, so neither length nor content leaks through timing). For git
    /// clients over HTTP, which can send a password but cannot make a fresh token.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        const LABEL: &str = "refvote-http-basic";
        let Some(other) = Secret::new(candidate) else {
            return false;
        };
        self.mac(LABEL)
            .verify_slice(&other.mac(LABEL).finalize().into_bytes())
            .is_ok()
    }

    /// The metadata value for a call made now: `Bearer <token>`.
    pub fn bearer_now(&self) -> String {
        format!("Bearer {}", self.token(SystemTime::now()))
    }

    /// Checks an `authorization` metadata value (`None`: the call sent none) against
    /// this secret at time `now`.
    pub fn check(&self, header: Option<&[u8]>, now: SystemTime) -> Result<(), TokenError> {
        let header = header.ok_or(TokenError::Missing)?;
        let header = std::str::from_utf8(header)
            .map_err(|_| TokenError::Malformed("the value is not UTF-8"))?;
        // The scheme is case-insensitive, as in HTTP and Gitaly's middleware.
        let token = match header.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token,
            _ => return Err(TokenError::Malformed("it is not \"Bearer <token>\"")),
        };
        let mut parts = token.splitn(3, '.');
        let (Some(version), Some(sig), Some(ts)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed(
                "the token is not <version>.<signature>.<time>",
            ));
        };
        if version != "v2" {
            return Err(TokenError::Version(version.chars().take(16).collect()));
        }
        let sig =
            hex::decode(sig).map_err(|_| TokenError::Malformed("the signature is not hex"))?;
        // Constant time: the comparison must not tell an attacker how much of a
        // forged signature was right.
        self.mac(ts)
            .verify_slice(&sig)
            .map_err(|_| TokenError::Signature)?;
        let issued: i64 = ts
            .parse()
            .map_err(|_| TokenError::Malformed("the time is not a decimal number"))?;
        let now = unix_seconds(now);
        let window = VALIDITY.as_secs() as i64;
        let skew = issued.saturating_sub(now);
        if skew < -window {
            return Err(TokenError::Expired { age: -skew });
        }
        if skew > window {
            return Err(TokenError::Future { ahead: skew });
        }
        Ok(())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} bytes>)", self.0.len())
    }
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// Why a call's token was refused. The messages say what the caller can fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(
        "no authorization token; send the shared secret as Gitaly's v2 token (authorization: Bearer v2.<hmac>.<time>)"
    )]
    Missing,
    #[error("malformed authorization token: {0}")]
    Malformed(&'static str),
    #[error("unsupported token version {0:?}; only Gitaly's v2 tokens are accepted")]
    Version(String),
    #[error("wrong token: its signature does not match this server's secret")]
    Signature,
    #[error("token expired: issued {age} s ago, more than 30 s; check the caller's clock")]
    Expired { age: i64 },
    #[error("token issued {ahead} s in the future, more than 30 s; check the caller's clock")]
    Future { ahead: i64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_only_the_secret_itself() {
        let s = Secret::new("hunter2").unwrap();
        assert!(s.matches(b"hunter2"));
        assert!(!s.matches(b"hunter3"));
        assert!(!s.matches(b"hunter"));
        assert!(!s.matches(b""));
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn bearer(s: &Secret, t: SystemTime) -> Vec<u8> {
        format!("Bearer {}", s.token(t)).into_bytes()
    }

    #[test]
    fn the_token_has_gitalys_shape() {
        let s = Secret::new("secret").unwrap();
        let t = s.token(at(1_700_000_000));
        let parts: Vec<&str> = t.split('.').collect();
        assert_eq!(parts.len(), 3, "{t}");
        assert_eq!(parts[0], "v2");
        assert_eq!(parts[2], "1700000000");
        assert_eq!(parts[1].len(), 64);
        assert!(
            parts[1]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        // HMAC-SHA256("secret", "1700000000"), computed independently:
        // printf 1700000000 | openssl dgst -sha256 -hmac secret
        assert_eq!(
            parts[1],
            "4b227f8831b3763d066901751ad4c583ed08832bf1924a4ec50c2e871b1e8586"
        );
    }

    #[test]
    fn a_good_token_passes_within_the_window() {
        let s = Secret::new("secret").unwrap();
        let now = at(1_700_000_000);
        for skew in [-30i64, -1, 0, 1, 30] {
            let issued = at((1_700_000_000 + skew) as u64);
            assert_eq!(
                s.check(Some(&bearer(&s, issued)), now),
                Ok(()),
                "skew {skew}"
            );
        }
        // The scheme's case does not matter.
        let lower = format!("bearer {}", s.token(now));
        assert_eq!(s.check(Some(lower.as_bytes()), now), Ok(()));
    }

    #[test]
    fn a_wrong_secret_is_refused() {
        let s = Secret::new("secret").unwrap();
        let other = Secret::new("secreT").unwrap();
        let now = at(1_700_000_000);
        assert_eq!(
            s.check(Some(&bearer(&other, now)), now),
            Err(TokenError::Signature)
        );
        // A signature for another time does not carry over.
        let t = s.token(now);
        let forged = format!("Bearer {}", t.replace("1700000000", "1700000001"));
        assert_eq!(
            s.check(Some(forged.as_bytes()), now),
            Err(TokenError::Signature)
        );
        // Nor does a truncated one.
        let short = format!("Bearer {}", t.replacen(&t[3..13], "", 1));
        assert_eq!(
            s.check(Some(short.as_bytes()), now),
            Err(TokenError::Signature)
        );
    }

    #[test]
    fn skewed_times_are_refused() {
        let s = Secret::new("secret").unwrap();
        let now = at(1_700_000_000);
        assert_eq!(
            s.check(Some(&bearer(&s, at(1_700_000_000 - 31))), now),
            Err(TokenError::Expired { age: 31 })
        );
        assert_eq!(
            s.check(Some(&bearer(&s, at(1_700_000_000 + 31))), now),
            Err(TokenError::Future { ahead: 31 })
        );
    }

    #[test]
    fn malformed_and_missing_tokens_are_refused() {
        let s = Secret::new("secret").unwrap();
        let now = at(1_700_000_000);
        assert_eq!(s.check(None, now), Err(TokenError::Missing));
        let good = s.token(now);
        for bad in [
            "",
            "Bearer",
            &good,                     // no scheme
            &format!("Basic {good}"),  // another scheme
            "Bearer v2.abc",           // two parts
            "Bearer v2.zz.1700000000", // not hex
            "Bearer v2..1700000000",   // empty signature: hex, but wrong
        ] {
            let r = s.check(Some(bad.as_bytes()), now);
            assert!(
                matches!(r, Err(TokenError::Malformed(_) | TokenError::Signature)),
                "{bad:?}: {r:?}"
            );
        }
        assert_eq!(
            s.check(Some(b"Bearer v1.abc.def"), now),
            Err(TokenError::Version("v1".into()))
        );
        assert!(matches!(
            s.check(Some(&[0xff, 0xfe]), now),
            Err(TokenError::Malformed(_))
        ));
        // A signed but non-numeric time is still refused.
        let sig = hex::encode(s.mac("soon").finalize().into_bytes());
        let t = format!("Bearer v2.{sig}.soon");
        assert!(matches!(
            s.check(Some(t.as_bytes()), now),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn an_empty_secret_is_not_a_secret() {
        assert!(Secret::new("").is_none());
        assert_eq!(
            format!("{:?}", Secret::new("hunter2").unwrap()),
            "Secret(<7 bytes>)"
        );
    }
}
