//! The `[auth]` section of the router's and votingd's configuration files (Gitaly's
//! key names).

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use crate::token::Secret;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// The shared secret callers sign their tokens with. Unset (and no `token_file`):
    /// calls are not authenticated.
    #[serde(default)]
    pub token: Option<String>,
    /// A file holding the shared secret (trailing whitespace ignored), so it need not
    /// sit in the config file. Mutually exclusive with `token`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Accept calls without a valid token but log them, while clients are being
    /// given the secret (Gitaly's `transitioning`).
    #[serde(default)]
    pub transitioning: bool,
}

/// A resolved `[auth]` section: the secret and what to do with a bad token.
#[derive(Debug, Clone)]
pub struct AuthPolicy {
    pub secret: Arc<Secret>,
    pub transitioning: bool,
}

impl AuthSettings {
    /// The policy, or `None` when auth is off. Reads `token_file`; an error names the
    /// key (`auth.…`) and says why.
    pub fn policy(&self) -> Result<Option<AuthPolicy>, (&'static str, String)> {
        let secret = match (&self.token, &self.token_file) {
            (Some(_), Some(_)) => {
                return Err((
                    "auth.token_file",
                    "set either auth.token or auth.token_file, not both".into(),
                ));
            }
            (Some(token), None) => Some(Secret::new(token.as_bytes()).ok_or((
                "auth.token",
                "is empty; set the shared secret, or remove the key to turn auth off".to_owned(),
            ))?),
            (None, Some(path)) => {
                let text = std::fs::read(path).map_err(|e| {
                    (
                        "auth.token_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                let end = text
                    .iter()
                    .rposition(|b| !b.is_ascii_whitespace())
                    .map_or(0, |i| i + 1);
                Some(Secret::new(&text[..end]).ok_or((
                    "auth.token_file",
                    format!(
                        "{} is empty; write the shared secret into it",
                        path.display()
                    ),
                ))?)
            }
            (None, None) => None,
        };
        match secret {
            Some(secret) => Ok(Some(AuthPolicy {
                secret: Arc::new(secret),
                transitioning: self.transitioning,
            })),
            None if self.transitioning => Err((
                "auth.transitioning",
                "needs auth.token or auth.token_file (the secret clients are moving to)".into(),
            )),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> AuthSettings {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn absent_means_off() {
        assert!(parse("").policy().unwrap().is_none());
    }

    #[test]
    fn a_token_or_a_file() {
        let p = parse("token = \"s3cret\"").policy().unwrap().unwrap();
        assert_eq!(*p.secret, Secret::new("s3cret").unwrap());
        assert!(!p.transitioning);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        let p = parse(&format!("token_file = {file:?}\ntransitioning = true"))
            .policy()
            .unwrap()
            .unwrap();
        assert_eq!(*p.secret, Secret::new("s3cret").unwrap());
        assert!(p.transitioning);
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("token = \"\"").policy().unwrap_err();
        assert_eq!(e.0, "auth.token");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, " \n").unwrap();
        let e = parse(&format!("token_file = {file:?}"))
            .policy()
            .unwrap_err();
        assert_eq!(e.0, "auth.token_file");
        assert!(e.1.contains("empty"), "{}", e.1);
        let e = parse("token_file = \"/nonexistent/token\"")
            .policy()
            .unwrap_err();
        assert_eq!(e.0, "auth.token_file");
        assert!(e.1.contains("/nonexistent/token"), "{}", e.1);
        let e = parse(&format!("token = \"a\"\ntoken_file = {file:?}"))
            .policy()
            .unwrap_err();
        assert_eq!(e.0, "auth.token_file");
        let e = parse("transitioning = true").policy().unwrap_err();
        assert_eq!(e.0, "auth.transitioning");
    }
}
