//! The check on git's smart HTTP (the router's HTTP front): a request carries either
//! Gitaly's v2 token (`Authorization: Bearer v2.…`, what GitLab's own components send)
//! or, for plain git clients, HTTP Basic credentials whose password is the shared
//! secret itself (any user name: git asks for it, or takes it from a credential
//! helper), since git cannot make a fresh token.
//!
//! It answers yes or no and why; the HTTP answer (401, `WWW-Authenticate`) is the
//! caller's.

use std::time::SystemTime;

use base64::Engine as _;

use crate::settings::AuthPolicy;
use crate::token::{Secret, TokenError};

/// Why an HTTP request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpAuthError {
    #[error("wrong password")]
    WrongPassword,
    #[error("malformed Basic credentials")]
    MalformedBasic,
    #[error(transparent)]
    Token(#[from] TokenError),
}

/// Checks an `Authorization` header value (`None`: the request sent none) against
/// `secret` at time `now`: Basic credentials by their password, anything else as a v2
/// bearer token.
pub fn check(
    secret: &Secret,
    authorization: Option<&[u8]>,
    now: SystemTime,
) -> Result<(), HttpAuthError> {
    match authorization {
        // The scheme is case-insensitive, as everywhere in HTTP.
        Some(h) if h.len() > 6 && h[..6].eq_ignore_ascii_case(b"basic ") => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(h[6..].trim_ascii())
                .map_err(|_| HttpAuthError::MalformedBasic)?;
            // `user:password`; the user name is not checked.
            let password = decoded
                .iter()
                .position(|&b| b == b':')
                .map(|i| &decoded[i + 1..])
                .unwrap_or(&[]);
            if secret.matches(password) {
                Ok(())
            } else {
                Err(HttpAuthError::WrongPassword)
            }
        }
        other => Ok(secret.check(other, now)?),
    }
}

/// What an admitted HTTP request may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    /// Proved with the read-only secret: clone and fetch, not push.
    ReadOnly,
}

impl AuthPolicy {
    /// [`check`] under this policy: the shared secret admits anything, the read-only
    /// one reads; in `transitioning` mode a refused request is let through (read-write)
    /// and logged.
    pub fn admit_http(
        &self,
        authorization: Option<&[u8]>,
        now: SystemTime,
    ) -> Result<Access, HttpAuthError> {
        let checked = check(&self.secret, authorization, now);
        if checked.is_err()
            && let Some(ro) = &self.read_only
            && check(ro, authorization, now).is_ok()
        {
            return Ok(Access::ReadOnly);
        }
        match checked {
            Ok(()) => Ok(Access::ReadWrite),
            Err(why) if self.transitioning => {
                tracing::warn!(%why, "unauthenticated HTTP request let through (auth.transitioning)");
                Ok(Access::ReadWrite)
            }
            Err(why) => Err(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn basic(credentials: &str) -> Vec<u8> {
        let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
        format!("Basic {encoded}").into_bytes()
    }

    #[test]
    fn basic_password_or_bearer_token() {
        let s = Secret::new("hunter2").unwrap();
        let now = SystemTime::now();
        assert_eq!(check(&s, Some(&basic("anyone:hunter2")), now), Ok(()));
        assert_eq!(check(&s, Some(&basic(":hunter2")), now), Ok(()));
        // The scheme in any case, padding around the credentials.
        let mut lower = basic("git:hunter2");
        lower[..6].copy_from_slice(b"bASIC ");
        lower.push(b' ');
        assert_eq!(check(&s, Some(&lower), now), Ok(()));
        assert_eq!(
            check(&s, Some(&basic("git:hunter3")), now),
            Err(HttpAuthError::WrongPassword)
        );
        // No colon: no password at all.
        assert_eq!(
            check(&s, Some(&basic("hunter2")), now),
            Err(HttpAuthError::WrongPassword)
        );
        assert_eq!(
            check(&s, Some(b"Basic !!!"), now),
            Err(HttpAuthError::MalformedBasic)
        );
        let bearer = format!("Bearer {}", s.token(now));
        assert_eq!(check(&s, Some(bearer.as_bytes()), now), Ok(()));
        let wrong = Secret::new("other").unwrap().bearer_now();
        assert_eq!(
            check(&s, Some(wrong.as_bytes()), now),
            Err(HttpAuthError::Token(TokenError::Signature))
        );
        let missing = check(&s, None, now).unwrap_err();
        assert_eq!(missing, HttpAuthError::Token(TokenError::Missing));
        assert!(missing.to_string().starts_with("no authorization token"));
    }

    #[test]
    fn transitioning_lets_everything_through() {
        let policy = |transitioning| AuthPolicy {
            secret: Arc::new(Secret::new("s").unwrap()),
            transitioning,
            read_only: None,
        };
        let now = SystemTime::now();
        assert_eq!(
            policy(false).admit_http(None, now),
            Err(HttpAuthError::Token(TokenError::Missing))
        );
        assert_eq!(policy(true).admit_http(None, now), Ok(Access::ReadWrite));
        assert_eq!(
            policy(true).admit_http(Some(&basic("x:wrong")), now),
            Ok(Access::ReadWrite)
        );
    }

    #[test]
    fn the_read_only_secret_admits_reads_only() {
        let policy = AuthPolicy {
            secret: Arc::new(Secret::new("rw").unwrap()),
            transitioning: false,
            read_only: Some(Arc::new(Secret::new("ro").unwrap())),
        };
        let now = SystemTime::now();
        let admit = |h: &[u8]| policy.admit_http(Some(h), now);
        assert_eq!(admit(&basic("git:rw")), Ok(Access::ReadWrite));
        assert_eq!(admit(&basic("git:ro")), Ok(Access::ReadOnly));
        let ro_token = format!("Bearer {}", Secret::new("ro").unwrap().token(now));
        assert_eq!(admit(ro_token.as_bytes()), Ok(Access::ReadOnly));
        assert_eq!(
            admit(&basic("git:other")),
            Err(HttpAuthError::WrongPassword)
        );
    }
}
